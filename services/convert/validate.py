"""Validate a TinyLLaVA dataset written by tinyllava.py (``trainyard convert validate PATH``).

Checks: the expected files are there and parse; every record has an id, an image and a
conversation that alternates human/gpt starting with human, with exactly one ``<image>`` token, in
the first turn; ids are unique; every referenced image exists and decodes at the expected size;
the splits are disjoint and the records sit in the split their model belongs to; and the counts in
dataset_info.json and MANIFEST.json (sizes and sha256 too) match the files.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from shared.errors import IntegrityError, NotFound
from shared.parallel import pool_context
from shared.storage.manifest import MANIFEST_NAME, Manifest, hash_bytes

from .tinyllava import OUTPUT_FILES

REQUIRED = ("train.json", "val.json", "train_val_split.json", "dataset_info.json", "tinyllava_metadata.json")
IMAGE_TOKEN = "<image>"
MIN_POOL_IMAGES = 500  # below this a process pool costs more than it saves


@dataclass
class Report:
    path: str
    problems: list[str] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, problem: str) -> None:
        self.problems.append(problem)

    def __str__(self) -> str:
        head = f"{self.path}: {'OK' if self.ok else f'{len(self.problems)} problem(s)'}"
        lines = [head] + [f"  {k}: {v}" for k, v in self.counts.items()]
        shown = self.problems[:50]
        lines += [f"  - {p}" for p in shown]
        if len(self.problems) > len(shown):
            lines.append(f"  ... and {len(self.problems) - len(shown)} more")
        return "\n".join(lines)


def _check_record(rec: Any, where: str, report: Report) -> bool:
    if not isinstance(rec, dict):
        report.add(f"{where}: record is not an object")
        return False
    ok = True
    for key in ("id", "image"):
        if not isinstance(rec.get(key), str) or not rec.get(key):
            report.add(f"{where}: missing or empty '{key}'")
            ok = False
    image = rec.get("image")
    if isinstance(image, str) and (image.startswith("/") or ".." in image.split("/")):
        report.add(f"{where}: image path {image!r} must be relative to the image folder")
        ok = False
    conv = rec.get("conversations")
    if not isinstance(conv, list) or len(conv) < 2:
        report.add(f"{where}: conversations must be a list of at least 2 turns")
        return False
    if len(conv) % 2:
        report.add(f"{where}: odd number of turns ({len(conv)})")
        ok = False
    tokens = 0
    for i, turn in enumerate(conv):
        expected = "human" if i % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != expected:
            got = turn.get("from") if isinstance(turn, dict) else type(turn).__name__
            report.add(f"{where}: turn {i} is from {got!r}, expected {expected!r} (turns must alternate)")
            ok = False
            continue
        value = turn.get("value")
        if not isinstance(value, str) or not value.strip():
            report.add(f"{where}: turn {i} has an empty value")
            ok = False
            continue
        tokens += value.count(IMAGE_TOKEN)
    if tokens != 1:
        report.add(f"{where}: {tokens} {IMAGE_TOKEN} tokens, expected exactly 1")
        ok = False
    elif isinstance(conv[0], dict) and IMAGE_TOKEN not in str(conv[0].get("value", "")):
        report.add(f"{where}: the {IMAGE_TOKEN} token is not in the first human turn")
        ok = False
    return ok


def _model_of(record_id: str) -> str:
    return record_id.rsplit("_", 1)[0]


def _check_image(args: tuple[str, str, tuple[int, int], bool]) -> str | None:
    """None when the image is fine, else the problem."""
    folder, name, size, decode = args
    try:
        if "://" in folder:
            from shared.storage import open_store

            data = open_store(folder).get_bytes(name)
            img = Image.open(io.BytesIO(data))
        else:
            img = Image.open(os.path.join(folder, name))
        with img:
            if img.size != size:
                return f"image {name} is {img.size[0]}x{img.size[1]}, expected {size[0]}x{size[1]}"
            if decode:
                img.load()
    except (FileNotFoundError, NotFound):
        return f"image {name} is missing from {folder}"
    except Exception as exc:  # noqa: BLE001 - any unreadable image is a finding, not a crash
        return f"image {name} does not decode: {type(exc).__name__}: {exc}"
    return None


def _check_images(folder: str, names: list[str], size: tuple[int, int], decode: bool, workers: int) -> list[str]:
    tasks = [(folder, n, size, decode) for n in names]
    if workers <= 1 or len(tasks) < MIN_POOL_IMAGES:
        results = [_check_image(t) for t in tasks]
    else:
        with pool_context().Pool(workers) as pool:
            results = pool.map(_check_image, tasks, chunksize=64)
    return [r for r in results if r]


def _check_manifest(root: Path, report: Report, num_records: int) -> None:
    mpath = root / MANIFEST_NAME
    if not mpath.exists():
        report.add(f"{MANIFEST_NAME} is missing (the dataset was not published)")
        return
    try:
        manifest = Manifest.from_json(mpath.read_bytes())
    except Exception as exc:  # noqa: BLE001 - reported as a finding
        report.add(f"{MANIFEST_NAME} does not parse: {exc}")
        return
    for rel, entry in manifest.files.items():
        f = root / rel
        if not f.exists():
            report.add(f"{rel} is listed in {MANIFEST_NAME} but missing")
        elif hash_bytes(f.read_bytes()) != entry:
            report.add(f"{rel} does not match its size/sha256 in {MANIFEST_NAME}")
    listed = manifest.meta.get("num_records")
    if listed is not None and listed != num_records:
        report.add(f"{MANIFEST_NAME} counts {listed} records, the files hold {num_records}")


def _local_copy(path: str) -> tuple[Path, tempfile.TemporaryDirectory | None]:
    if "://" not in path:
        return Path(path), None
    from shared.storage import open_location

    store, prefix = open_location(path)
    tmp = tempfile.TemporaryDirectory(prefix="tinyllava-validate-")
    # download_dir verifies every file against the manifest; keep the manifest for the count checks.
    store.download_dir(prefix, tmp.name)
    (Path(tmp.name) / MANIFEST_NAME).write_bytes(store.read_manifest(prefix).to_json())
    return Path(tmp.name), tmp


def validate_tinyllava(
    path: str | Path,
    *,
    image_folder: str | None = None,
    image_size: tuple[int, int] | None = None,
    decode: bool = True,
    workers: int | None = None,
) -> Report:
    """Check a converted dataset at a local directory or store URL; see the module doc for the checks.

    ``image_folder`` and ``image_size`` default to what tinyllava_metadata.json records;
    ``decode=False`` reads only the image headers (fast, still checks existence and size).
    """
    report = Report(str(path))
    try:
        root, tmp = _local_copy(str(path))
    except (NotFound, IntegrityError) as exc:
        report.add(str(exc))
        return report
    try:
        return _validate(root, report, image_folder, image_size, decode,
                         workers if workers is not None else min(4, os.cpu_count() or 1))
    finally:
        if tmp is not None:
            tmp.cleanup()


def _validate(root: Path, report: Report, image_folder, image_size, decode, workers) -> Report:
    if not root.is_dir():
        report.add(f"{root} is not a directory")
        return report
    docs: dict[str, Any] = {}
    for name in REQUIRED + (OUTPUT_FILES["test"],):
        f = root / name
        if not f.exists():
            if name in REQUIRED:
                report.add(f"{name} is missing")
            continue
        try:
            docs[name] = json.loads(f.read_bytes())
        except ValueError as exc:
            report.add(f"{name} is not valid JSON: {exc}")
    meta = docs.get("tinyllava_metadata.json") or {}
    folder = image_folder or meta.get("image_folder")
    size = tuple(image_size or meta.get("image_size") or (512, 512))

    # Records.
    seen_ids: dict[str, str] = {}
    models_in: dict[str, set[str]] = {}
    images: set[str] = set()
    total = 0
    for split, fname in OUTPUT_FILES.items():
        records = docs.get(fname)
        if records is None:
            continue
        if not isinstance(records, list):
            report.add(f"{fname} must hold a list of records")
            continue
        models_in[split] = set()
        total += len(records)
        for i, rec in enumerate(records):
            where = f"{fname}[{i}]"
            if not _check_record(rec, where, report):
                continue
            rid = rec["id"]
            if rid in seen_ids:
                report.add(f"{where}: id {rid!r} already used in {seen_ids[rid]}")
            seen_ids[rid] = fname
            models_in[split].add(_model_of(rid))
            images.add(rec["image"])
    report.counts["records"] = total
    report.counts.update({f"{s}_records": len(docs.get(f) or []) for s, f in OUTPUT_FILES.items() if f in docs})

    # Splits: the split file's lists are disjoint and each record file holds only its split's models.
    split_doc = docs.get("train_val_split.json")
    if isinstance(split_doc, dict):
        named = {"train": set(split_doc.get("train") or []), "val": set(split_doc.get("validation") or []),
                 "test": set(split_doc.get("test") or [])}
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            both = named[a] & named[b]
            if both:
                report.add(f"train_val_split.json: {len(both)} model(s) in both {a} and {b}, e.g. {sorted(both)[0]}")
        for split, models in models_in.items():
            stray = models - named[split]
            if stray:
                report.add(f"{OUTPUT_FILES[split]}: {len(stray)} model(s) not in the {split} split, "
                           f"e.g. {sorted(stray)[0]}")
    elif split_doc is not None:
        report.add("train_val_split.json must be an object with train / validation / test")
    splits = list(models_in)
    for i, a in enumerate(splits):
        for b in splits[i + 1:]:
            both = models_in[a] & models_in[b]
            if both:
                report.add(f"{len(both)} model(s) have records in both {OUTPUT_FILES[a]} and {OUTPUT_FILES[b]}, "
                           f"e.g. {sorted(both)[0]}")

    # Counts.
    info = docs.get("dataset_info.json")
    if isinstance(info, dict):
        if info.get("num_records") != total:
            report.add(f"dataset_info.json counts {info.get('num_records')} records, the files hold {total}")
        for split, counts in (info.get("splits") or {}).items():
            fname = OUTPUT_FILES.get(split)
            actual = len(docs.get(fname) or []) if fname else None
            if actual is not None and counts.get("records") != actual:
                report.add(f"dataset_info.json counts {counts.get('records')} {split} records, "
                           f"{fname} holds {actual}")
    _check_manifest(root, report, total)

    # Images.
    if not folder:
        report.add("no image folder: tinyllava_metadata.json has none and none was given")
    elif images:
        report.counts["images"] = len(images)
        for problem in _check_images(str(folder), sorted(images), size, decode, workers):
            report.add(problem)
    return report

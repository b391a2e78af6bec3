"""DeepCAD cad_json + rendered views -> LLaVA / TinyLLaVA conversation JSON.

Each model with all three rendered views gives three records (one per view):
``{"id": "<model>_<view>", "image": "<model>_<view>.png", "conversations": [
{"from": "human", "value": "<image>\\n<prompt>"}, {"from": "gpt", "value": <description>}]}``
where ``image`` is relative to the rendered dataset's ``images/`` folder, the prompt varies by view
and template, and the description comes from the JSON (describe.py). Splits are by model, so the
three views of a model never straddle train and val.

Outputs: train.json, val.json (and test.json when a split file sends models there),
train_val_split.json (DeepCAD keys train / validation / test, usable as a split file again),
dataset_info.json and tinyllava_metadata.json, published with a manifest written last.
"""
from __future__ import annotations

import json
import os
import random
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shared import deadlines
from shared.cad.budget import model_budget, model_budget_s
from shared.errors import InvalidArgument, NotFound
from shared.logs import get_logger
from shared.parallel import pool_context
from shared.storage import ArtifactStore, is_url, open_output
from shared.storage.manifest import now_iso

from .describe import describe_cad

log = get_logger(__name__)

FORMAT_VERSION = "tinyllava/1"
VIEWS = ("front", "top", "right")
SPLIT_KEYS = {"train": "train", "validation": "val", "test": "test"}
OUTPUT_FILES = {"train": "train.json", "val": "val.json", "test": "test.json"}

VIEW_WORDS = {
    "front": "front view (looking along +Y)",
    "top": "top view (looking down along -Z)",
    "right": "right view (looking along -X)",
}
TEMPLATES = (
    "This is the {view} of a CAD part. Describe how the part is constructed.",
    "The image shows the {view} of a mechanical part. Explain the sketches and extrusions that build it.",
    "Here is an orthographic {view} of a 3D model. What construction steps produce this model?",
    "Look at this {view} of a CAD model. Describe its sketch planes, profiles, dimensions and extrude operations.",
    "Given the {view} of this part, write the sequence of sketch and extrude features that creates it.",
    "Describe the CAD construction history of the part shown in this {view}.",
    "This {view} comes from a parametric CAD model. Reconstruct its modelling steps in words.",
    "How would you model the part in this {view}? List each sketch, its shapes and how it is extruded.",
)


@dataclass
class ConvertStats:
    models: int = 0  # models written to some split
    records: int = 0
    train_records: int = 0
    val_records: int = 0
    test_records: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> model count
    failures: list[dict[str, str]] = field(default_factory=list)  # {"model_id", "reason"} per model not described
    split_source: str = "seeded"
    seconds: float = 0.0
    out: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def human_prompt(record_id: str, view: str, seed: int) -> str:
    # crc32 instead of hash(): stable across processes and PYTHONHASHSEED.
    k = zlib.crc32(f"{seed}:{record_id}".encode()) % len(TEMPLATES)
    return "<image>\n" + TEMPLATES[k].format(view=VIEW_WORDS[view])


def make_records(model_id: str, description: str, seed: int) -> list[dict]:
    out = []
    for view in VIEWS:
        rid = f"{model_id}_{view}"
        out.append({
            "id": rid,
            "image": f"{rid}.png",
            "conversations": [
                {"from": "human", "value": human_prompt(rid, view, seed)},
                {"from": "gpt", "value": description},
            ],
        })
    return out


# ---- inputs: a local directory or a store URL ----

def _list_cad_json(source: str) -> dict[str, str]:
    """model id -> path or key of every cad_json file (model id = file name without .json)."""
    from shared.cad.deepcad import list_cad_json

    keys, _ = list_cad_json(source)
    out: dict[str, str] = {}
    for k in sorted(keys):
        mid = k.rsplit("/", 1)[-1].removesuffix(".json")
        if mid in out:
            raise InvalidArgument(f"two cad_json files share the model id {mid!r}: {out[mid]} and {k}")
        out[mid] = k
    return out


def _list_images(rendered: str) -> set[str]:
    """File names under the rendered dataset's images/ folder."""
    if is_url(rendered):
        from shared.storage import open_store

        return {k.rsplit("/", 1)[-1] for k in open_store(rendered).list("images")}
    folder = Path(rendered) / "images"
    if not folder.is_dir():
        raise NotFound(f"rendered dataset {rendered} has no images/ folder")
    return set(os.listdir(folder))


def _read_rendered_meta(rendered: str) -> dict:
    try:
        if is_url(rendered):
            from shared.storage import open_store

            return json.loads(open_store(rendered).get_bytes("metadata.json"))
        return json.loads((Path(rendered) / "metadata.json").read_bytes())
    except (NotFound, FileNotFoundError):
        return {}


# Below this many models a process pool costs more than it saves.
MIN_POOL_ITEMS = 200

_worker_source: str | None = None
_worker_budget_s = 0.0
_worker_store: dict[str, Any] = {}


def _init_describe(source: str, budget_s: float, deadline: float | None = None) -> None:
    global _worker_source, _worker_budget_s
    _worker_source, _worker_budget_s = source, budget_s
    deadlines.carry(deadline)  # a pool worker stops with the job when the client's deadline passes
    # Each worker opens its own store client (they do not survive a fork).
    _worker_store.clear()


def _describe_one(item: tuple[str, str]) -> tuple[str, str | None, str | None]:
    """(model id, description, error) for one cad_json path or key."""
    mid, key = item
    source = _worker_source
    try:
        with model_budget(mid, _worker_budget_s):
            if source is not None and is_url(source):
                if "store" not in _worker_store:
                    from shared.storage import open_store

                    _worker_store["store"] = open_store(source)
                data = json.loads(_worker_store["store"].get_bytes(key))
            else:
                with open(key, "rb") as f:
                    data = json.loads(f.read())
            return mid, describe_cad(data), None
    except deadlines.DeadlineExceeded:
        raise  # the client gave up: the whole conversion stops, not just this model
    except Exception as exc:  # noqa: BLE001 - a bad model is skipped and counted, never fatal
        return mid, None, f"{type(exc).__name__}: {exc}"


def _describe_all(items: list[tuple[str, str]], source: str, workers: int,
                  budget_s: float) -> list[tuple[str, str | None, str | None]]:
    if workers <= 1 or len(items) < MIN_POOL_ITEMS:
        _init_describe(source, budget_s)
        return [_describe_one(it) for it in items]
    initargs = (source, budget_s, deadlines.current_deadline())
    with pool_context().Pool(workers, initializer=_init_describe, initargs=initargs) as pool:
        return pool.map(_describe_one, items, chunksize=max(16, len(items) // (workers * 8)))


# ---- splits ----

def load_split_file(path: str | Path) -> dict[str, set[str]]:
    """A DeepCAD split file ({"train": [...], "validation": [...], "test": [...]}) as split -> model ids.

    DeepCAD lists ids as "0000/00000007"; the model id is the last path part.
    """
    try:
        raw = json.loads(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"cannot read split file {path}: {exc}") from None
    if not isinstance(raw, dict) or not any(k in raw for k in SPLIT_KEYS):
        raise InvalidArgument(f"split file {path} needs keys among {sorted(SPLIT_KEYS)}")
    out: dict[str, set[str]] = {}
    for key, name in SPLIT_KEYS.items():
        out[name] = {str(i).rsplit("/", 1)[-1].removesuffix(".json") for i in raw.get(key) or []}
    seen: dict[str, str] = {}
    for name, ids in out.items():
        for mid in ids:
            if mid in seen:
                raise InvalidArgument(f"split file {path}: model {mid} is in both {seen[mid]} and {name}")
            seen[mid] = name
    return out


def seeded_split(model_ids: list[str], seed: int, val_fraction: float) -> dict[str, list[str]]:
    if not 0.0 <= val_fraction < 1.0:
        raise InvalidArgument(f"val_fraction must be in [0, 1), got {val_fraction}")
    ids = sorted(model_ids)
    random.Random(seed).shuffle(ids)
    n_val = round(len(ids) * val_fraction)
    if val_fraction > 0 and len(ids) >= 2:
        n_val = max(1, n_val)
    return {"train": sorted(ids[n_val:]), "val": sorted(ids[:n_val]), "test": []}


# ---- output ----

def _length_stats(records: list[dict]) -> dict[str, float]:
    """Conversation length in characters (all turns) and words (the answer)."""
    if not records:
        return {"mean_chars": 0, "min_chars": 0, "max_chars": 0, "mean_words": 0, "min_words": 0, "max_words": 0}
    chars = [sum(len(t["value"]) for t in r["conversations"]) for r in records]
    words = [len(r["conversations"][1]["value"].split()) for r in records]
    return {"mean_chars": round(sum(chars) / len(chars), 1), "min_chars": min(chars), "max_chars": max(chars),
            "mean_words": round(sum(words) / len(words), 1), "min_words": min(words), "max_words": max(words)}


def _publish(store: ArtifactStore, prefix: str, files: dict[str, bytes], meta: dict) -> str:
    """Publish under ``prefix`` with MANIFEST.json written last (under the prefix's write lease)."""
    store.publish(prefix, files, meta=meta)
    return f"{store.url.rstrip('/')}/{prefix}"


def convert_tinyllava(
    cad_json: str | Path,
    rendered: str | Path,
    out: str | Path,
    *,
    split_file: str | Path | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    workers: int | None = None,
    budget_s: float | None = None,
) -> ConvertStats:
    """Convert a cad_json folder (or store prefix) and its rendered views into a TinyLLaVA dataset.

    Describing one model may take ``budget_s`` seconds (default: shared.cad.budget's); a model that takes
    longer is skipped like a malformed one, and both are listed with their reason in ``failures``.
    """
    t0 = time.perf_counter()
    cad_json, rendered, out = str(cad_json), str(rendered), str(out)
    out_store, out_prefix = open_output(out)  # refused before any work when it may not be written
    sources = _list_cad_json(cad_json)
    images = _list_images(rendered)
    rendered_meta = _read_rendered_meta(rendered)
    image_size = int((rendered_meta.get("config") or {}).get("size", 512))
    stats = ConvertStats()
    skipped: dict[str, int] = {}

    have_views = [m for m in sources if all(f"{m}_{v}.png" in images for v in VIEWS)]
    if len(have_views) < len(sources):
        skipped["missing_images"] = len(sources) - len(have_views)

    if split_file is not None:
        wanted = load_split_file(split_file)
        stats.split_source = f"file:{Path(split_file).name}"
        assign = {m: name for name, ids in wanted.items() for m in ids}
        in_split = [m for m in have_views if m in assign]
        if len(in_split) < len(have_views):
            skipped["not_in_split"] = len(have_views) - len(in_split)
        candidates = in_split
    else:
        candidates = have_views

    workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    budget_s = model_budget_s() if budget_s is None else budget_s
    described = _describe_all([(m, sources[m]) for m in candidates], cad_json, workers, budget_s)
    descriptions = {}
    for mid, text, err in described:
        if text is None:
            skipped["describe_failed"] = skipped.get("describe_failed", 0) + 1
            stats.failures.append({"model_id": mid, "reason": err})
            log.warning("model skipped", extra={"model_id": mid, "reason": err})
        else:
            descriptions[mid] = text
    if not descriptions:
        raise InvalidArgument(f"no model of {cad_json} has all views rendered in {rendered} and a valid JSON")

    if split_file is not None:
        split = {name: sorted(m for m in descriptions if assign[m] == name) for name in ("train", "val", "test")}
    else:
        split = seeded_split(list(descriptions), seed, val_fraction)

    records = {name: [r for m in ids for r in make_records(m, descriptions[m], seed)] for name, ids in split.items()}
    files: dict[str, bytes] = {}
    for name in ("train", "val", "test"):
        if name != "test" or records["test"]:
            # Compact: json's C encoder only runs without indent, several times faster here.
            files[OUTPUT_FILES[name]] = json.dumps(records[name], ensure_ascii=False).encode()
    files["train_val_split.json"] = json.dumps(
        {"train": split["train"], "validation": split["val"], "test": split["test"]}, indent=1).encode()
    all_records = records["train"] + records["val"] + records["test"]
    counts = {name: {"models": len(split[name]), "records": len(records[name])} for name in ("train", "val", "test")}
    info = {
        "num_models": len(descriptions),
        "num_records": len(all_records),
        "records_per_model": len(VIEWS),
        "splits": counts,
        "skipped": skipped,
        "conversation_length": _length_stats(all_records),
    }
    metadata = {
        "format": "llava",
        "generator": FORMAT_VERSION,
        "image_folder": (rendered.rstrip("/") if is_url(rendered) else str(Path(rendered).resolve())) + "/images",
        "image_size": [image_size, image_size],
        "views": list(VIEWS),
        "templates": len(TEMPLATES),
        "source": {"cad_json": cad_json, "rendered": rendered,
                   "render_generator": rendered_meta.get("generator_version")},
        "split_source": stats.split_source,
        "seed": seed,
        "val_fraction": val_fraction,
        "files": {name: OUTPUT_FILES[name] for name in ("train", "val", "test") if OUTPUT_FILES[name] in files},
        "created": now_iso(),
    }
    files["dataset_info.json"] = json.dumps(info, indent=1).encode()
    files["tinyllava_metadata.json"] = json.dumps(metadata, indent=1).encode()
    stats.out = _publish(out_store, out_prefix, files,
                         meta={"kind": "tinyllava", **info, "image_size": metadata["image_size"]})

    stats.models = len(descriptions)
    stats.records = len(all_records)
    stats.train_records, stats.val_records, stats.test_records = (len(records[n]) for n in ("train", "val", "test"))
    stats.skipped = skipped
    stats.seconds = round(time.perf_counter() - t0, 3)
    log.info("tinyllava converted", extra=stats.as_dict())
    return stats

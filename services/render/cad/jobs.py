"""Per-model rendering and the two sharded jobs (``cad`` and ``cad-synth``) for services.render.shards.

Both jobs follow the ``run_sharded`` contract: picklable, deterministic per item index, and
``render_shard`` returns relative path -> bytes. A model that cannot be parsed, rebuilt or rendered
never stops a run: it is listed with its reason in the shard's ``failures/<shard>.json`` and in
the shard info that ``summarize`` merges into the dataset metadata.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared import deadlines
from shared.cad.budget import model_budget, model_budget_s
from shared.cad.deepcad import CadFormatError, list_cad_json, load_cad_json, parse_cad
from shared.errors import InvalidArgument, TrainyardError
from shared.logs import get_logger

from .geometry import mesh_arrays, rebuild
from .raster import VIEW_NAMES, encode_png, render_views

log = get_logger(__name__)

GENERATOR_VERSION = "cad-render/1"
SYNTH_VERSION = "cad-synth/1"


def render_cad(data: dict, *, size: int = 512, compress_level: int = 1) -> dict[str, bytes]:
    """PNG bytes of the front, top and right views of one cad_json model (view name -> bytes)."""
    verts, tris = mesh_arrays(rebuild(parse_cad(data)))
    images = render_views(verts, tris, size=size)
    return {view: encode_png(img, compress_level) for view, img in images.items()}


def failure_reason(exc: BaseException) -> str:
    """A one-line reason: our own errors carry a readable message, anything else gets its type."""
    if isinstance(exc, TrainyardError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def image_name(model_id: str, view: str) -> str:
    return f"{model_id}_{view}.png"


@dataclass
class CadRenderJob:
    """Render each input cad_json file to ``images/<model_id>_{front,top,right}.png``.

    ``inputs`` are JSON file paths (or keys in the store at ``source`` when given); the model id is
    the file name without ``.json``, as DeepCAD names its models. Each model gets ``budget_s`` seconds
    (shared.cad.budget); one that takes longer is recorded as failed.
    """

    inputs: list[str]
    source: str | None = None  # store URL the inputs are keys of; None: they are local paths
    location: str | None = None  # where the inputs were listed from, recorded in the config
    seed: int = 0  # rendering uses no randomness; kept for the job contract
    shard_size: int = 64
    size: int = 512
    budget_s: float = field(default_factory=model_budget_s)
    kind: str = "cad"
    generator_version: str = GENERATOR_VERSION
    _store: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Image names are built from the model id, so two inputs with one id would overwrite each other.
        seen: set[str] = set()
        dup: set[str] = set()
        for i in range(len(self.inputs)):
            mid = self.model_id(i)
            (dup if mid in seen else seen).add(mid)
        if dup:
            raise InvalidArgument(f"duplicate model ids among the inputs: {sorted(dup)[:5]}")

    @classmethod
    def from_input(cls, location: str | Path, **kwargs) -> CadRenderJob:
        """All cad_json files under a local directory or a store URL (``s3://…``, ``file://…``), sorted."""
        inputs, source = list_cad_json(location)
        return cls(inputs=inputs, source=source, location=str(location), **kwargs)

    @property
    def total(self) -> int:
        return len(self.inputs)

    @property
    def config(self) -> dict:
        # A resumed run must read the same inputs: their location and count are part of the spec.
        return {"size": self.size, "views": list(VIEW_NAMES), "input": self.location,
                "inputs": len(self.inputs), "format": "png"}

    def estimate_bytes(self) -> int:
        return self.total * 3 * 12_000  # ~12 KB per mostly-white 512x512 PNG view

    def model_id(self, index: int) -> str:
        return Path(self.inputs[index]).name.removesuffix(".json")

    def _load(self, index: int) -> dict:
        if self.source is None:
            return load_cad_json(self.inputs[index])
        if self._store is None:
            from shared.storage import open_store

            self._store = open_store(self.source)
        try:
            return json.loads(self._store.get_bytes(self.inputs[index]))
        except ValueError as exc:
            raise CadFormatError(f"{self.inputs[index]}: not JSON ({exc})") from None

    def render_item(self, index: int) -> tuple[dict[str, bytes], dict | None]:
        """(files, None) on success, ({}, failure record) when the model cannot be rendered."""
        mid = self.model_id(index)
        try:
            with model_budget(mid, self.budget_s):
                pngs = render_cad(self._load(index), size=self.size)
        except deadlines.DeadlineExceeded:
            raise  # the client gave up: the whole job stops, not just this model
        except Exception as exc:  # noqa: BLE001 - any bad model is reported, never fatal
            reason = failure_reason(exc)
            log.warning("cad model failed", extra={"model_id": mid, "reason": reason})
            return {}, {"index": index, "model_id": mid, "input": self.inputs[index], "reason": reason}
        return {f"images/{image_name(mid, v)}": data for v, data in pngs.items()}, None

    def render_shard(self, index: int, start: int, stop: int) -> dict[str, bytes]:
        files: dict[str, bytes] = {}
        failures = []
        for i in range(start, stop):
            out, failure = self.render_item(i)
            files.update(out)
            if failure:
                failures.append(failure)
        # Always written, so a shard of only failures still has a file and the record is complete.
        files[f"failures/{index:05d}.json"] = json.dumps(failures, indent=1).encode()
        return files

    def shard_info(self, index: int, start: int, stop: int, files: dict[str, bytes]) -> dict:
        failures = json.loads(files[f"failures/{index:05d}.json"])
        return {"rendered": (stop - start) - len(failures), "failed": len(failures),
                "failures": [{"model_id": f["model_id"], "reason": f["reason"]} for f in failures]}

    def summarize(self, records: list[dict]) -> dict:
        failures = [f for r in records for f in r.get("info", {}).get("failures", [])]
        return {"models": self.total, "rendered": sum(r.get("info", {}).get("rendered", 0) for r in records),
                "failed": len(failures), "failures": failures}

    def __getstate__(self) -> dict:
        # The store client is per process; workers open their own.
        state = dict(self.__dict__)
        state["_store"] = None
        return state


@dataclass
class CadSynthJob:
    """``total`` random valid DeepCAD models as ``json/<id>.json``; item i uses seed (seed, i)."""

    seed: int
    total: int
    shard_size: int = 256
    kind: str = "cad-synth"
    generator_version: str = SYNTH_VERSION

    @property
    def config(self) -> dict:
        return {"format": "deepcad-json"}

    def estimate_bytes(self) -> int:
        return self.total * 12_000

    def render_shard(self, index: int, start: int, stop: int) -> dict[str, bytes]:
        from .synth import generate_cad_json, item_seed

        return {f"json/{i:08d}.json": json.dumps(generate_cad_json(item_seed(self.seed, i)), indent=1).encode()
                for i in range(start, stop)}


def render_directory(input_dir: str | Path, out_dir: str | Path, *, size: int = 512) -> dict:
    """Render every model under ``input_dir`` into ``out_dir/images`` without sharding (small sets, tools).

    Returns {"rendered", "failed", "failures", "seconds"}.
    """
    job = CadRenderJob.from_input(input_dir, size=size)
    out = Path(out_dir) / "images"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    failures = []
    for i in range(job.total):
        files, failure = job.render_item(i)
        for rel, data in files.items():
            (Path(out_dir) / rel).write_bytes(data)
        if failure:
            failures.append(failure)
    return {"rendered": job.total - len(failures), "failed": len(failures), "failures": failures,
            "seconds": round(time.perf_counter() - t0, 3)}

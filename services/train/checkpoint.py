"""Checkpoints as safetensors + JSON, published atomically to the artifact store. Nothing is ever pickled.

Layout under ``runs/<run_id>/checkpoints/``:
  epoch-0007/   every epoch; the newest prefix with a MANIFEST.json is "last" (a publish killed half-way
                leaves no manifest, so resume skips it); older epoch dirs are pruned to the newest ``keep``.
  best/         republished whenever the monitored metric improves.
Each holds ``model.safetensors`` (weights), ``ema.safetensors`` (the weights' moving average, when the run
keeps one), ``optimizer.safetensors`` (the optimizer's tensors),
``rng.safetensors`` (torch CPU/CUDA RNG bytes as uint8 tensors) and ``state.json`` (the optimizer's
non-tensor structure, scheduler state, numpy/python RNG, epoch, best metric, early-stopping counters,
loader state, MLflow run id, metric history).
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from shared.errors import FailedPrecondition, IntegrityError, InvalidArgument, NotFound, ResourceExhausted
from shared.logs import get_logger

log = get_logger(__name__)

_EPOCH_DIR = re.compile(r"^epoch-(\d{4,})$")


def checkpoints_prefix(run_id: str) -> str:
    return f"runs/{run_id}/checkpoints"


def epoch_prefix(run_id: str, epoch: int) -> str:
    return f"{checkpoints_prefix(run_id)}/epoch-{epoch:04d}"


def best_prefix(run_id: str) -> str:
    return f"{checkpoints_prefix(run_id)}/best"


# ---------------------------------------------------------------- tensors <-> safetensors + JSON

def flatten_tensors(obj: Any, prefix: str = "t") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested structure into JSON (tensors replaced by {"__tensor__": key}) and a tensor dict.

    Int dict keys (the optimizer's param indices) and tuples are tagged so they come back as they were:
    load_state_dict relies on both.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(o: Any, path: str) -> Any:
        if isinstance(o, torch.Tensor):
            key = f"{prefix}.{len(tensors)}"
            tensors[key] = o.detach().to("cpu").contiguous()
            return {"__tensor__": key}
        if isinstance(o, dict):
            if all(isinstance(k, str) for k in o):
                return {"__dict__": {k: walk(v, f"{path}.{k}") for k, v in o.items()}}
            return {"__items__": [[walk(k, path), walk(v, f"{path}.{k}")] for k, v in o.items()]}
        if isinstance(o, tuple):
            return {"__tuple__": [walk(v, path) for v in o]}
        if isinstance(o, list):
            return [walk(v, path) for v in o]
        if o is None or isinstance(o, (bool, int, float, str)):
            return o
        if isinstance(o, (np.integer, np.floating, np.bool_)):
            return o.item()
        raise InvalidArgument(f"cannot checkpoint a {type(o).__name__} at {path}")

    return walk(obj, prefix), tensors


def unflatten_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [unflatten_tensors(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            try:
                return tensors[obj["__tensor__"]]
            except KeyError as exc:
                raise IntegrityError(f"checkpoint references missing tensor {obj['__tensor__']}") from exc
        if "__dict__" in obj:
            return {k: unflatten_tensors(v, tensors) for k, v in obj["__dict__"].items()}
        if "__items__" in obj:
            return {unflatten_tensors(k, tensors): unflatten_tensors(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(unflatten_tensors(v, tensors) for v in obj["__tuple__"])
        raise IntegrityError(f"unexpected object in checkpoint JSON: {sorted(obj)}")
    return obj


def state_dict_bytes(model: torch.nn.Module) -> bytes:
    """The model's weights as safetensors bytes (tied/shared tensors are cloned so safetensors accepts them)."""
    sd = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    return st_save(sd)


# ---------------------------------------------------------------- RNG

def capture_rng() -> tuple[dict, dict[str, torch.Tensor]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    meta = {
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "python": [py_version, list(py_state), py_gauss],
    }
    return meta, tensors


def restore_rng(meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda_")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    py_version, py_state, py_gauss = meta["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))


# ---------------------------------------------------------------- save / load

@dataclass
class Checkpoint:
    """What a resumed run needs, read back from one published prefix."""

    prefix: str
    epoch: int
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict
    state: dict  # everything else from state.json (scheduler, best metric, counters, history, ...)
    # Other weights saved beside the model's, by name ("ema").
    extra_states: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    rng_meta: dict = field(default_factory=dict)
    rng_tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def restore_rng(self) -> None:
        restore_rng(self.rng_meta, self.rng_tensors)


def build_files(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, state: dict,
                model_bytes: bytes | None = None, extra: dict[str, torch.nn.Module] | None = None) -> dict[str, bytes]:
    """The checkpoint's files in memory; ``state`` must be JSON-able (scheduler state, counters, ...);
    ``extra`` modules are saved as ``<name>.safetensors``."""
    files = {"model.safetensors": model_bytes if model_bytes is not None else state_dict_bytes(model)}
    for name, module in (extra or {}).items():
        files[f"{name}.safetensors"] = state_dict_bytes(module)
    doc = dict(state)
    if optimizer is not None:
        opt_json, opt_tensors = flatten_tensors(optimizer.state_dict(), prefix="opt")
        files["optimizer.safetensors"] = st_save(opt_tensors)
        doc["optimizer"] = opt_json
    rng_meta, rng_tensors = capture_rng()
    files["rng.safetensors"] = st_save(rng_tensors)
    doc["rng"] = rng_meta
    files["state.json"] = json.dumps(doc, sort_keys=True).encode()
    return files


def save_checkpoint(store, run_id: str, epoch: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None, state: dict, *, best: bool = False,
                    keep: int = 2, extra: dict[str, torch.nn.Module] | None = None) -> str:
    """Publish ``epoch-NNNN`` (and ``best`` when ``best``), then prune old epoch dirs. Returns the prefix."""
    files = build_files(model, optimizer, {**state, "epoch": epoch}, extra=extra)
    prefix = epoch_prefix(run_id, epoch)
    meta = {"run_id": run_id, "epoch": epoch, "kind": "epoch"}
    try:
        store.publish(prefix, files, meta=meta)
        if best:
            publish_best(store, run_id, files, epoch)
    except ResourceExhausted as exc:  # a full disk: the publish removed what it wrote, older checkpoints stand
        last = latest_checkpoint(store, run_id)
        kept = f"{last.rsplit('/', 1)[-1]} is kept" if last else "there is no earlier checkpoint"
        raise ResourceExhausted(
            f"epoch {epoch}'s checkpoint of run {run_id!r} was not written ({exc}); {kept}: free space, then "
            f"resume the run (trainyard train --config <its config> --run-id {run_id})") from exc
    prune_checkpoints(store, run_id, keep=keep)
    return prefix


def publish_best(store, run_id: str, files: dict[str, bytes], epoch: int) -> None:
    # overwrite=True removes the old manifest first: a crash mid-publish leaves `best` unpublished (resume
    # republishes it from the epoch checkpoint), never a manifest that pairs with another epoch's files.
    store.publish(best_prefix(run_id), files, meta={"run_id": run_id, "epoch": epoch, "kind": "best"},
                  overwrite=True)


def list_epoch_checkpoints(store, run_id: str) -> list[tuple[int, str]]:
    """(epoch, prefix) of every complete epoch checkpoint, oldest first."""
    base = checkpoints_prefix(run_id)
    out = []
    for key in store.list(base + "/"):
        rel = key[len(base) + 1:]
        parts = rel.split("/")
        if len(parts) == 2 and parts[1] == "MANIFEST.json":
            m = _EPOCH_DIR.match(parts[0])
            if m:
                out.append((int(m.group(1)), f"{base}/{parts[0]}"))
    return sorted(out)


def latest_checkpoint(store, run_id: str) -> str | None:
    """The newest complete epoch checkpoint ("last"), or None when the run has none."""
    found = list_epoch_checkpoints(store, run_id)
    return found[-1][1] if found else None


def prune_checkpoints(store, run_id: str, keep: int = 2) -> None:
    complete = list_epoch_checkpoints(store, run_id)
    if len(complete) <= keep:
        return
    newest_kept = complete[-keep][0]
    base = checkpoints_prefix(run_id)
    # Also sweep torn dirs (no manifest) older than what we keep: leftovers of killed publishes.
    dirs = {key[len(base) + 1:].split("/")[0] for key in store.list(base + "/")}
    for d in sorted(dirs):
        m = _EPOCH_DIR.match(d)
        if m and int(m.group(1)) < newest_kept:
            store.delete_prefix(f"{base}/{d}/")


def load_checkpoint(store, prefix: str) -> Checkpoint:
    """Read and verify (sha256 against the manifest) a published checkpoint."""
    if not store.is_published(prefix):
        raise NotFound(f"no complete checkpoint at {prefix}")
    manifest = store.read_manifest(prefix)
    model_state = st_load(store.get_verified(prefix, "model.safetensors"))
    doc = json.loads(store.get_verified(prefix, "state.json"))
    optimizer_state: dict = {}
    if "optimizer.safetensors" in manifest.files:
        opt_tensors = st_load(store.get_verified(prefix, "optimizer.safetensors"))
        # CPU tensors: Optimizer.load_state_dict moves state onto each parameter's device itself.
        optimizer_state = unflatten_tensors(doc.pop("optimizer"), opt_tensors)
    rng_tensors = st_load(store.get_verified(prefix, "rng.safetensors")) \
        if "rng.safetensors" in manifest.files else {}
    rng_meta = doc.pop("rng", {})
    known = {"model.safetensors", "optimizer.safetensors", "rng.safetensors"}
    extra = {name.removesuffix(".safetensors"): st_load(store.get_verified(prefix, name))
             for name in manifest.files if name.endswith(".safetensors") and name not in known}
    return Checkpoint(prefix=prefix, epoch=int(doc["epoch"]), model_state=model_state,
                      optimizer_state=optimizer_state, state=doc, extra_states=extra, rng_meta=rng_meta,
                      rng_tensors=rng_tensors)


def ensure_resumable(store, run_id: str, cfg_hash: str, remedy: str) -> None:
    """Refuse (FailedPrecondition) to resume ``run_id`` under another config than its newest checkpoint was
    trained with (``state.json`` keeps the hash): its weights would go on under other settings (an epochs=1
    resubmission of a 3-epoch run exported the epoch-3 weights). ``remedy`` says what to do instead. A checkpoint
    that cannot be read passes: the resumed run reports that, with its reason."""
    prefix = latest_checkpoint(store, run_id)
    if prefix is None:
        return
    try:
        trained_with = json.loads(store.get_verified(prefix, "state.json")).get("config_hash")
    except (IntegrityError, NotFound):
        return
    if trained_with and trained_with != cfg_hash:
        raise FailedPrecondition(f"run {run_id!r} has checkpoints trained with another config (hash {trained_with}, "
                                 f"this one is {cfg_hash}): {remedy}")

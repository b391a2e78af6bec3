"""Model registry: trainyard's own builders by name, with timm names passed through.

Nothing here ever downloads weights: timm is always called with ``pretrained=False`` and
pretrained weights come only from a local file given as ``pretrained_path``.
"""
from __future__ import annotations

import difflib
import fnmatch
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from shared.errors import InvalidArgument, NotFound
from shared.logs import get_logger

log = get_logger(__name__)

Builder = Callable[..., nn.Module]
_REGISTRY: dict[str, Builder] = {}


def register_model(fn: Builder | None = None, *, name: str | None = None):
    """Register a builder under its function name (or ``name``); usable bare or with arguments."""

    def wrap(builder: Builder) -> Builder:
        key = name or builder.__name__
        if key in _REGISTRY and _REGISTRY[key] is not builder:
            raise InvalidArgument(f"model {key!r} is already registered")
        _REGISTRY[key] = builder
        return builder

    return wrap(fn) if fn is not None else wrap


def is_registered(name: str) -> bool:
    return name in _REGISTRY


def builder_accepts(name: str, argument: str) -> bool:
    """Whether ``create_model(name, ...)`` takes ``argument``: a registered builder names it or takes
    ``**kwargs``. A name that is not registered (timm's, or unknown) answers True: timm's models take
    ``in_chans`` and ``num_classes``, and ``create_model`` reports an unknown name itself."""
    builder = _REGISTRY.get(name)
    if builder is None:
        return True
    params = inspect.signature(builder).parameters
    return argument in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def model_description(name: str) -> str:
    """First line of the builder's docstring, shown by ``trainyard models list``."""
    doc = (_REGISTRY[name].__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


def list_models(pattern: str | None = None, include_timm: bool = False) -> list[str]:
    """Registered names (sorted), optionally filtered by a glob ``pattern``; timm's after ours."""
    names = sorted(_REGISTRY)
    if pattern:
        names = fnmatch.filter(names, pattern)
    if include_timm:
        names += [n for n in timm.list_models(pattern or "") if n not in _REGISTRY]
    return names


def _unknown(name: str) -> NotFound:
    candidates = sorted(_REGISTRY) + timm.list_models()
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    hint = f"; did you mean: {', '.join(close)}?" if close else ""
    return NotFound(f"unknown model {name!r}{hint}")


def create_model(
    name: str,
    num_classes: int | None = None,
    in_chans: int | None = None,
    pretrained_path: str | Path | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build ``name``: a registered trainyard model, else a timm model (never with downloaded weights).

    ``num_classes`` / ``in_chans`` left as None keep the builder's defaults (10 classes, 1 channel for
    the MNIST nets; 1000 / 3 for timm). ``pretrained_path`` loads a local .safetensors / .pth / .bin.
    """
    if kwargs.pop("pretrained", False):
        raise InvalidArgument("pretrained=True would download weights; pass pretrained_path= to a local file")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if in_chans is not None:
        kwargs["in_chans"] = in_chans
    if name in _REGISTRY:
        try:
            model = _REGISTRY[name](**kwargs)
        except TypeError as exc:
            raise InvalidArgument(f"bad arguments for model {name!r}: {exc}") from exc
    elif timm.is_model(name):
        try:
            model = timm.create_model(name, pretrained=False, **kwargs)
        except TypeError as exc:
            raise InvalidArgument(f"bad arguments for timm model {name!r}: {exc}") from exc
    else:
        raise _unknown(name)
    if pretrained_path is not None:
        load_pretrained(model, pretrained_path)
    return model


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors, or .pth/.bin/.pt with ``torch.load(weights_only=True)``."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"pretrained weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except SafetensorError as exc:
            raise InvalidArgument(f"{path} is not a valid safetensors file: {exc}") from exc
    if path.suffix not in (".pth", ".pt", ".bin"):
        raise InvalidArgument(f"{path}: weights must be .safetensors, .pth, .pt or .bin")
    try:
        # weights_only refuses arbitrary pickled objects: the file may come from anywhere.
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise InvalidArgument(f"cannot load weights from {path}: {exc}") from exc
    # Training checkpoints often wrap the weights; accept the common wrappers.
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InvalidArgument(f"{path} does not hold a state dict of tensors")
    return obj


def _head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Classifier module names, whose weights may legitimately differ from the file (new class count)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    head = cfg.get("classifier")
    if not head:
        return ()
    heads = (head,) if isinstance(head, str) else tuple(head)
    return tuple(h + "." for h in heads)


def load_pretrained(model: nn.Module, path: str | Path) -> dict[str, list[str]]:
    """Load a local weights file into ``model`` (see :func:`load_state`)."""
    return load_state(model, read_state_dict(path), str(path))


def load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> dict[str, list[str]]:
    """Load pretrained weights into ``model``; classifier weights that do not fit are skipped.

    Any other missing, unexpected or mis-shaped key is an error: a silent partial load would train
    from a half-random backbone. Returns the skipped head keys (``{"skipped": [...], "missing": [...]}``).
    """
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    heads = _head_prefixes(model)
    is_head = lambda key: any(key.startswith(h) for h in heads)  # noqa: E731
    skipped, bad = [], []
    for key, value in list(state.items()):
        if key not in own:
            (skipped if is_head(key) else bad).append(f"unexpected {key}")
        elif own[key].shape != value.shape:
            (skipped if is_head(key) else bad).append(
                f"{key} shape {tuple(value.shape)} != model {tuple(own[key].shape)}"
            )
        else:
            continue
        del state[key]
    missing = [k for k in own if k not in state]
    bad += [f"missing {k}" for k in missing if not is_head(k)]
    if bad:
        more = f" (+{len(bad) - 8} more)" if len(bad) > 8 else ""
        raise InvalidArgument(f"weights in {source} do not fit the model: {'; '.join(bad[:8])}{more}")
    model.load_state_dict(state, strict=False)
    head_missing = [k for k in missing if is_head(k)]
    if skipped or head_missing:
        log.info("pretrained head not loaded", extra={"source": source, "skipped": skipped,
                                                       "missing": head_missing})
    return {"skipped": skipped, "missing": head_missing}

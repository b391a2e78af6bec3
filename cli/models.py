"""`trainyard models list|summary|promote|weights`: the model zoo, a model's layer-by-layer table, registry
aliases, and a published model's weights as a local file another config can start from."""
from __future__ import annotations

import argparse
from typing import Any

from cli.output import add_output_options, emit
from shared.errors import InvalidArgument

# The zoo (torch, timm) is imported where it is used: every `trainyard` call, shell completion included,
# imports this module, and torch takes seconds to import.


def parse_input_size(text: str) -> tuple[int, ...]:
    """``"3x224x224"`` -> (3, 224, 224)."""
    try:
        dims = tuple(int(d) for d in text.lower().replace(",", "x").split("x"))
    except ValueError:
        raise InvalidArgument(f"input size {text!r} is not of the form CxHxW, e.g. 1x28x28") from None
    if len(dims) != 3 or min(dims) <= 0:
        raise InvalidArgument(f"input size {text!r} is not of the form CxHxW, e.g. 1x28x28")
    return dims


def models_list(pattern: str | None = None, include_timm: bool = False) -> list[dict[str, Any]]:
    """The zoo's models (name, source, params, description), ours first; timm's only by name."""
    from shared.models.registry import create_model, is_registered, list_models, model_description
    from shared.models.summary import count_params

    return [{"name": name, "source": "trainyard", "params": count_params(create_model(name)),
             "description": model_description(name)} if is_registered(name) else
            {"name": name, "source": "timm", "params": None, "description": None}
            for name in list_models(pattern, include_timm=include_timm)]


def format_models_list(rows: list[dict[str, Any]], pattern: str | None = None) -> str:
    ours = [r for r in rows if r["source"] == "trainyard"]
    width = max((len(r["name"]) for r in ours), default=0)
    lines = [f"{r['name'].ljust(width)}  {r['params']:>12,}  {r['description']}" for r in ours]
    others = [r["name"] for r in rows if r["source"] != "trainyard"]
    if others:
        lines.append(f"timm models ({len(others)}):")
        lines += [f"  {n}" for n in others]
    return "\n".join(lines) if lines else f"no model matches {pattern!r}"


def _list_args(args: Any) -> tuple[str | None, bool]:
    """``args`` is the argparse namespace; ``pattern`` (glob) and ``timm`` / ``include_timm`` are optional."""
    return getattr(args, "pattern", None), bool(getattr(args, "timm", False) or getattr(args, "include_timm", False))


def cmd_models_list(args: Any = None) -> str:
    """Registered models with their parameter counts; timm names too when ``args.timm`` is set."""
    pattern, include_timm = _list_args(args)
    return format_models_list(models_list(pattern, include_timm), pattern)


def models_summary(name: str, input_str: str = "1x28x28", num_classes: int | None = None):
    """The layer-by-layer ``Summary`` of ``name`` for one ``CxHxW`` input; input channels follow ``input_str``
    for the models built with a channel count (a model with fixed input channels, like cad_captioner's RGB,
    is built as it is)."""
    from shared.models.registry import builder_accepts, create_model
    from shared.models.summary import model_summary

    size = parse_input_size(input_str)
    channels = {"in_chans": size[0]} if builder_accepts(name, "in_chans") else {}
    model = create_model(name, num_classes=num_classes, **channels)
    return model_summary(model, size, name=name)


def cmd_models_summary(name: str, input_str: str = "1x28x28", num_classes: int | None = None) -> str:
    return models_summary(name, input_str, num_classes).to_text()


def cmd_models_promote(name: str, version: int, alias: str) -> str:
    """Point the registry alias ``name@alias`` at ``version`` (the engine sets champion/challenger itself)."""
    from shared.tracking.registry import set_alias

    set_alias(None, name, alias, version)
    return f"{name}@{alias} -> version {version}"


def models_weights(ref: str, out: str) -> dict[str, Any]:
    """Write the published model ``ref`` (``store:models/<name>[/<version>]``) to ``out`` (.safetensors) with
    its architecture, input size and normalisation in the file's metadata, for ``model.pretrained: <out>``."""
    from shared.models.pretrained import is_published_ref, read_pretrained, write_weights_file
    from shared.storage import open_store

    pre = read_pretrained(ref if is_published_ref(ref) else f"store:models/{ref}", open_store())
    path = write_weights_file(pre, out)
    return {"path": str(path), **pre.provenance}


def _run(args) -> int:
    if args.action == "weights":
        if not args.name or not args.out:
            raise SystemExit("trainyard models weights needs a published model (name[/version]) and --out FILE")
        info = models_weights(args.name, args.out)
        emit(args, info, lambda: f"wrote {info['path']} from {info['source']} (sha256 {info['sha256'][:12]}...)")
        return 0
    if args.action == "list":
        pattern, include_timm = _list_args(args)
        rows = models_list(pattern, include_timm)
        emit(args, rows, lambda: format_models_list(rows, pattern))
        return 0
    if args.action == "promote":
        if not args.name or args.version is None:
            raise SystemExit("trainyard models promote needs a model name and --version")
        text = cmd_models_promote(args.name, args.version, args.alias)
        emit(args, {"model": args.name, "alias": args.alias, "version": args.version}, text)
        return 0
    if not args.name:
        raise SystemExit("trainyard models summary needs a model name")
    summary = models_summary(args.name, args.input, args.num_classes)
    emit(args, summary.to_dict(), summary.to_text)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the model zoo, print a model's layer-by-layer summary, point a "
                                      "registry alias (champion, challenger) at a published version, or write a "
                                      "published model's weights to a file (weights)")
    p.add_argument("action", choices=["list", "summary", "promote", "weights"])
    p.add_argument("name", nargs="?", help="summary: the architecture; promote: the published model's name; "
                                           "weights: the published model, name[/version] or store:models/...")
    p.add_argument("--out", help="weights: the .safetensors file to write (model.pretrained: FILE loads it)")
    p.add_argument("--version", type=int, help="promote: the version the alias should name")
    p.add_argument("--alias", default="champion", help="promote: the alias (default champion)")
    p.add_argument("--input", default="1x28x28", help="summary: input size CxHxW")
    p.add_argument("--num-classes", type=int)
    p.add_argument("--pattern", help="list: only names matching this glob")
    p.add_argument("--timm", action="store_true", help="list: include timm's models")
    add_output_options(p)
    p.set_defaults(func=_run)

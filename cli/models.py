"""`trainyard models list|summary`: the model zoo and a model's layer-by-layer table."""
from __future__ import annotations

import argparse
from typing import Any

from shared.errors import InvalidArgument
from shared.models.registry import create_model, is_registered, list_models, model_description
from shared.models.summary import count_params, model_summary


def parse_input_size(text: str) -> tuple[int, ...]:
    """``"3x224x224"`` -> (3, 224, 224)."""
    try:
        dims = tuple(int(d) for d in text.lower().replace(",", "x").split("x"))
    except ValueError:
        raise InvalidArgument(f"input size {text!r} is not of the form CxHxW, e.g. 1x28x28") from None
    if len(dims) != 3 or min(dims) <= 0:
        raise InvalidArgument(f"input size {text!r} is not of the form CxHxW, e.g. 1x28x28")
    return dims


def cmd_models_list(args: Any = None) -> str:
    """Registered models with their parameter counts; timm names too when ``args.timm`` is set.

    ``args`` is the argparse namespace; ``pattern`` (glob) and ``timm`` / ``include_timm`` are optional.
    """
    pattern = getattr(args, "pattern", None)
    include_timm = bool(getattr(args, "timm", False) or getattr(args, "include_timm", False))
    names = list_models(pattern, include_timm=include_timm)
    ours = [n for n in names if is_registered(n)]
    lines = []
    width = max((len(n) for n in ours), default=0)
    for name in ours:
        params = count_params(create_model(name))
        lines.append(f"{name.ljust(width)}  {params:>12,}  {model_description(name)}")
    others = [n for n in names if not is_registered(n)]
    if others:
        lines.append(f"timm models ({len(others)}):")
        lines += [f"  {n}" for n in others]
    return "\n".join(lines) if lines else f"no model matches {pattern!r}"


def cmd_models_summary(name: str, input_str: str = "1x28x28", num_classes: int | None = None) -> str:
    """The layer-by-layer table of ``name`` for one ``CxHxW`` input; input channels follow ``input_str``."""
    size = parse_input_size(input_str)
    model = create_model(name, num_classes=num_classes, in_chans=size[0])
    return model_summary(model, size, name=name).to_text()


def cmd_models_promote(name: str, version: int, alias: str) -> str:
    """Point the registry alias ``name@alias`` at ``version`` (the engine sets champion/challenger itself)."""
    from shared.tracking.registry import set_alias

    set_alias(None, name, alias, version)
    return f"{name}@{alias} -> version {version}"


def _run(args) -> int:
    if args.action == "list":
        print(cmd_models_list(args))
        return 0
    if args.action == "promote":
        if not args.name or args.version is None:
            raise SystemExit("trainyard models promote needs a model name and --version")
        print(cmd_models_promote(args.name, args.version, args.alias))
        return 0
    if not args.name:
        raise SystemExit("trainyard models summary needs a model name")
    print(cmd_models_summary(args.name, args.input, args.num_classes))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the model zoo, print a model's layer-by-layer summary, or point a "
                                      "registry alias (champion, challenger) at a published version")
    p.add_argument("action", choices=["list", "summary", "promote"])
    p.add_argument("name", nargs="?", help="summary: the architecture; promote: the published model's name")
    p.add_argument("--version", type=int, help="promote: the version the alias should name")
    p.add_argument("--alias", default="champion", help="promote: the alias (default champion)")
    p.add_argument("--input", default="1x28x28", help="summary: input size CxHxW")
    p.add_argument("--num-classes", type=int)
    p.add_argument("--pattern", help="list: only names matching this glob")
    p.add_argument("--timm", action="store_true", help="list: include timm's models")
    p.set_defaults(func=_run)

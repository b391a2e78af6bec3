"""The output choice of every command that lists or shows: text for people (the default), or one JSON
document for scripts with ``--json`` (alias ``-o json``). Keys are field names, never column titles, so they
stay put when the text layout changes."""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from typing import Any


def add_output_options(parser: argparse.ArgumentParser) -> None:
    # dest ``output_format``: ``--output`` already names an output location in some commands (``job``)
    parser.add_argument("--json", dest="output_format", action="store_const", const="json",
                        help="print one JSON document (stable field names) instead of text")
    parser.add_argument("-o", dest="output_format", choices=("text", "json"), help="output format (default text)")
    parser.set_defaults(output_format="text")


def wants_json(args: argparse.Namespace) -> bool:
    return getattr(args, "output_format", "text") == "json"


def emit(args: argparse.Namespace, data: Any, text: str | Callable[[], str]) -> None:
    """Print ``data`` as JSON when the command was asked for it, else ``text`` (or what it returns)."""
    if wants_json(args):
        print(json.dumps(_finite(data), indent=2, allow_nan=False))
    else:
        print(text() if callable(text) else text)


def note(args: argparse.Namespace, text: str) -> None:
    """A line for the person at the terminal beside the result (files written, where a report is): on stdout
    with text output, on stderr with JSON so that stdout stays one JSON document."""
    print(text, file=sys.stderr if wants_json(args) else sys.stdout)


def _finite(value: Any) -> Any:
    """NaN and infinities (a diverged loss) become null: JSON has no such numbers and strict parsers (jq)
    refuse Python's ``NaN``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def proto_dict(message) -> dict[str, Any]:
    """Every field of a protobuf message under its proto name, defaults included, enums by name. Not
    ``json_format.MessageToDict``: the proto3 JSON mapping writes 64-bit integers as strings."""
    def scalar(field, value):
        if field.message_type is not None:
            return proto_dict(value)
        if field.enum_type is not None:
            return field.enum_type.values_by_number[value].name
        return value

    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {k: scalar(value_field, v) for k, v in value.items()}
        elif field.is_repeated:
            out[field.name] = [scalar(field, v) for v in value]
        else:
            out[field.name] = scalar(field, value)
    return out

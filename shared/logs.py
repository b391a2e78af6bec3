"""Logging with a request/run id carried in a context variable: JSON lines (services, workers, anything whose
stderr a machine reads) or, for a person at a terminal, one readable line per record."""
from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

# Attributes every LogRecord has; anything else came from `extra=` and goes into the JSON object.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}

FORMATS = ("json", "text", "auto")


def _fields(record: logging.LogRecord) -> dict:
    """The request id and the record's `extra=` fields."""
    out = {}
    rid = request_id.get()
    if rid:
        out["request_id"] = rid
    for key, value in record.__dict__.items():
        if key not in _STANDARD and not key.startswith("_"):
            out[key] = value
    return out


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """``12:04:31.207 INFO    services.render.digits: digits rendered  prefix=/data/x train=60`` (the same
    fields as the JSON object, for reading at a terminal)."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}"
        line = f"{stamp} {record.levelname:<7} {record.name}: {record.getMessage()}"
        fields = _fields(record)
        if fields:
            line += "  " + " ".join(f"{k}={_value(v)}" for k, v in fields.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _value(value) -> str:
    """A field's value as one token: strings bare unless they need quotes, anything else as JSON (no reprs)."""
    text = value if isinstance(value, str) else json.dumps(value, default=str, separators=(",", ":"))
    return json.dumps(text) if not text or any(c.isspace() or c in "\"=" for c in text) else text


def configure(level: str | int = "INFO", stream=None, fmt: str = "json") -> None:
    """Send every log record to ``stream`` (stderr), one per line: as a JSON object (``fmt="json"``, what the
    services use), as readable text (``"text"``), or ``"auto"``: text when the stream is a terminal, JSON
    otherwise (the CLI: a person reads its terminal, a pipe or a log collector parses JSON)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {', '.join(FORMATS)}")
    stream = stream or sys.stderr
    if fmt == "auto":
        isatty = getattr(stream, "isatty", None)
        fmt = "text" if isatty is not None and isatty() else "json"
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter() if fmt == "text" else JsonFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)

"""Per-run event records: JSON lines the TrainService follows to report state and per-epoch metrics.

Records (one JSON object per line, each with a unix ``ts``):
  {"type": "state", "state": "RUNNING|SUCCEEDED|FAILED|CANCELLED", "message": str, ...extra}
  {"type": "epoch_start", "epoch": n, "epochs": total}
  {"type": "epoch", "epoch": n, "epochs": total, "metrics": {name: float}}
  {"type": "checkpoint", "epoch": n, "prefix": "runs/<id>/checkpoints/epoch-000n", "best": bool}
  {"type": "model", "name": str, "version": int, "uri": "models/<name>/<version>"}

The local file is appended and flushed per record; the whole file is copied to the artifact store under
``runs/<run_id>/events.jsonl`` at each epoch end and on every state change, so a Kubernetes backend with no
shared disk can follow the run too.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from shared.logs import get_logger
from shared.settings import load_settings

log = get_logger(__name__)

STATES = ("RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")


def events_key(run_id: str) -> str:
    return f"runs/{run_id}/events.jsonl"


def default_events_path(run_id: str) -> Path:
    return load_settings().home / "runs" / run_id / "events.jsonl"


class EventWriter:
    """Appends records to ``path`` and mirrors the file to ``store`` (when given) on ``sync()``."""

    def __init__(self, path: str | Path, run_id: str, store=None):
        self.path = Path(path)
        self.run_id = run_id
        self.store = store
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A restarted pod has a fresh disk: continue the stored history instead of overwriting it.
        if store is not None and not self.path.exists() and store.exists(events_key(run_id)):
            self.path.write_bytes(store.get_bytes(events_key(run_id)))
        self._fh = open(self.path, "a", encoding="utf-8")

    def emit(self, type_: str, **fields: Any) -> dict:
        record = {"type": type_, "ts": round(time.time(), 3), **fields}
        self._fh.write(json.dumps(record, allow_nan=False, default=_jsonable) + "\n")
        self._fh.flush()
        return record

    def state(self, state: str, message: str = "", **fields: Any) -> dict:
        if state not in STATES:
            raise ValueError(f"unknown run state {state!r}")
        record = self.emit("state", state=state, message=message, **fields)
        self.sync()
        return record

    def epoch_start(self, epoch: int, epochs: int) -> dict:
        return self.emit("epoch_start", epoch=epoch, epochs=epochs)

    def epoch(self, epoch: int, epochs: int, metrics: dict[str, float]) -> dict:
        record = self.emit("epoch", epoch=epoch, epochs=epochs, metrics=metrics)
        self.sync()
        return record

    def sync(self) -> None:
        """Copy the file to the store; a store hiccup must not kill training, the next sync retries."""
        self._fh.flush()
        os.fsync(self._fh.fileno())
        if self.store is None:
            return
        try:
            self.store.put_bytes(events_key(self.run_id), self.path.read_bytes())
        except Exception as exc:  # noqa: BLE001 - any store error is retried at the next sync
            log.warning("could not mirror events to the store", extra={"run_id": self.run_id, "error": str(exc)})

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()


def _jsonable(value: Any) -> Any:
    # numpy / torch scalars reach here from metric dicts.
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def parse_events(text: str) -> list[dict]:
    """Parse an events file; a torn last line (the writer was killed mid-write) is skipped."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def read_events(path: str | Path) -> list[dict]:
    path = Path(path)
    return parse_events(path.read_text(encoding="utf-8")) if path.exists() else []


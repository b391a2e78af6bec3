"""The manifest that marks a prefix as published: its file list with sizes and sha256 digests."""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from shared.errors import IntegrityError, TrainyardError

MANIFEST_NAME = "MANIFEST.json"
MANIFEST_VERSION = 1
_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str


@dataclass
class Manifest:
    files: dict[str, FileEntry]
    meta: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    version: int = MANIFEST_VERSION

    def to_json(self) -> bytes:
        doc = {
            "version": self.version,
            "files": {rel: {"size": e.size, "sha256": e.sha256} for rel, e in sorted(self.files.items())},
            "meta": self.meta,
            "created": self.created,
        }
        return json.dumps(doc, indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str = "manifest") -> Manifest:
        try:
            doc = json.loads(data)
            files = {rel: FileEntry(int(e["size"]), str(e["sha256"])) for rel, e in doc["files"].items()}
            return cls(
                files=files,
                meta=dict(doc.get("meta") or {}),
                created=str(doc.get("created", "")),
                version=int(doc.get("version", MANIFEST_VERSION)),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise IntegrityError(f"{where} is not a valid manifest: {exc}") from exc

    @property
    def total_size(self) -> int:
        return sum(e.size for e in self.files.values())


@contextlib.contextmanager
def reading_meta(where: str) -> Iterator[None]:
    """Read what a manifest's ``meta`` promises inside this block: a field that is missing or of the wrong
    type (a hand-edited manifest) is damaged data, DATA_LOSS with the field named, not a server bug."""
    try:
        yield
    except TrainyardError:
        raise
    except KeyError as exc:
        raise IntegrityError(f"{where}: the manifest's metadata lacks the field {exc.args[0]!r}") from None
    except (IndexError, TypeError, ValueError, AttributeError) as exc:
        raise IntegrityError(f"{where}: the manifest's metadata is malformed ({exc})") from None


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def hash_bytes(data: bytes) -> FileEntry:
    return FileEntry(len(data), hashlib.sha256(data).hexdigest())


def hash_stream(stream: BinaryIO, sink: BinaryIO | None = None) -> FileEntry:
    """Hash ``stream`` chunk by chunk (copying it to ``sink`` on the way) without holding it in memory."""
    digest = hashlib.sha256()
    size = 0
    while chunk := stream.read(_CHUNK):
        digest.update(chunk)
        size += len(chunk)
        if sink is not None:
            sink.write(chunk)
    return FileEntry(size, digest.hexdigest())


def check_entry(expected: FileEntry, actual: FileEntry, where: str) -> None:
    if actual.size != expected.size:
        raise IntegrityError(f"{where}: size {actual.size} does not match the manifest's {expected.size}")
    if actual.sha256 != expected.sha256:
        raise IntegrityError(
            f"{where}: sha256 {actual.sha256[:12]}… does not match the manifest's {expected.sha256[:12]}…"
        )

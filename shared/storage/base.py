"""The artifact store interface; everything but the primitive byte operations lives here, once.

Keys are '/'-separated paths relative to the store's root. A *prefix* is a directory of keys:
``list("models/a")`` returns the keys under ``models/a/``, never ``models/ab``. A prefix is
*published* once ``<prefix>/MANIFEST.json`` exists, and ``publish`` writes that file last, so a
reader that sees the manifest sees every file it names.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import os
import pathlib
import re
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any, BinaryIO

from shared.errors import AlreadyExists, IntegrityError, InvalidArgument, NotFound, ResourceExhausted
from shared.logs import get_logger
from shared.storage.lease import LEASE_NAME, Lease, held
from shared.storage.manifest import (
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    check_entry,
    hash_bytes,
    hash_stream,
    now_iso,
)

log = get_logger(__name__)

# Local writes stage through files with this name prefix; reserving it everywhere keeps keys
# portable between backends and lets listings skip half-written files.
TEMP_PREFIX = ".tytmp-"


def validate_key(key: str, what: str = "key") -> str:
    """Return ``key`` if it is a safe relative path, else raise InvalidArgument."""
    if not isinstance(key, str) or not key:
        raise InvalidArgument(f"{what} must be a non-empty string, got {key!r}")
    if key.startswith("/") or re.match(r"[A-Za-z]:/", key):
        raise InvalidArgument(f"{what} {key!r} is absolute; keys are relative to the store root")
    if "\\" in key or "\x00" in key:
        raise InvalidArgument(f"{what} {key!r} contains a backslash or NUL byte")
    for segment in key.split("/"):
        if segment == "":
            raise InvalidArgument(f"{what} {key!r} has an empty path segment")
        if segment in (".", ".."):
            raise InvalidArgument(f"{what} {key!r} contains a {segment!r} segment")
        if segment.startswith(TEMP_PREFIX):
            raise InvalidArgument(f"{what} {key!r} uses the reserved name prefix {TEMP_PREFIX!r}")
        if segment == LEASE_NAME:
            raise InvalidArgument(f"{what} {key!r} uses the reserved name {LEASE_NAME!r} (a writer's lease)")
    return key


def is_reserved(key: str) -> bool:
    """Whether ``key`` is the store's own bookkeeping (a staged write, a lease), never data."""
    name = key.rsplit("/", 1)[-1]
    return name == LEASE_NAME or name.startswith(TEMP_PREFIX)


# Out of space (or quota): the store reports it as ResourceExhausted, whichever write ran into it.
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def _disk_full_is_resource_exhausted(where: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        if exc.errno not in _DISK_FULL:
            raise
        raise ResourceExhausted(f"no space left on the device writing {where}: {exc.strerror}") from exc


def _prefix(prefix: str, allow_root: bool) -> str:
    """Normalise a directory prefix: no trailing '/', '' meaning the root where allowed."""
    prefix = prefix.rstrip("/") if isinstance(prefix, str) else prefix
    if prefix == "" and allow_root:
        return ""
    return validate_key(prefix, "prefix")


def _join(prefix: str, rel: str) -> str:
    return f"{prefix}/{rel}" if prefix else rel


class ArtifactStore(abc.ABC):
    """A flat key -> bytes store with directory-style prefixes and manifest-based publishing."""

    url: str

    # ---- primitives each backend implements (keys already validated) ----

    @abc.abstractmethod
    def _write_bytes(self, key: str, data: bytes) -> None: ...

    @abc.abstractmethod
    def _write_file(self, key: str, path: pathlib.Path) -> None: ...

    @abc.abstractmethod
    def _open(self, key: str) -> BinaryIO:
        """A readable binary stream; raises NotFound when the key is absent."""

    @abc.abstractmethod
    def _list(self, prefix: str) -> list[str]:
        """All keys under directory ``prefix`` ('' for everything), in any order."""

    @abc.abstractmethod
    def _exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def _delete(self, key: str) -> None:
        """Remove ``key``; absent keys are not an error."""

    @abc.abstractmethod
    def _delete_prefix(self, prefix: str) -> None: ...

    # Conditional writes for leases (see shared.storage.lease); a version is an opaque string.

    @abc.abstractmethod
    def _lease_read(self, key: str) -> tuple[bytes, str] | None:
        """(content, version) of ``key``, or None when it is absent."""

    @abc.abstractmethod
    def _lease_write(self, key: str, data: bytes, version: str | None) -> str | None:
        """Write ``key`` only if it is absent (``version`` None) or still at ``version``; the new
        version, or None when the condition failed."""

    @abc.abstractmethod
    def _lease_delete(self, key: str, version: str) -> None:
        """Delete ``key`` only if it is still at ``version``."""

    # Seconds a lease lives without renewal on this backend; None: it never lapses (see lease.py).
    lease_ttl: float | None = None

    # ---- plain object operations ----

    def put_bytes(self, key: str, data: bytes) -> None:
        with _disk_full_is_resource_exhausted(f"{self.url}/{key}"):
            self._write_bytes(validate_key(key), bytes(data))

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        path = pathlib.Path(path)
        if not path.is_file():
            raise NotFound(f"local file {path} does not exist")
        with _disk_full_is_resource_exhausted(f"{self.url}/{key}"):
            self._write_file(validate_key(key), path)

    def open_read(self, key: str) -> BinaryIO:
        return self._open(validate_key(key))

    def get_bytes(self, key: str) -> bytes:
        with self.open_read(key) as f:
            return f.read()

    def get_file(self, key: str, path: str | os.PathLike) -> pathlib.Path:
        """Download ``key`` to ``path`` via a temp file, so ``path`` is never left half-written."""
        path = pathlib.Path(path)
        with self.open_read(key) as src:
            _atomic_write_stream(src, path)
        return path

    def list(self, prefix: str = "") -> list[str]:
        return sorted(k for k in self._list(_prefix(prefix, allow_root=True)) if not is_reserved(k))

    def exists(self, key: str) -> bool:
        return self._exists(validate_key(key))

    def delete(self, key: str) -> None:
        self._delete(validate_key(key))

    def delete_prefix(self, prefix: str) -> None:
        # The root is refused on purpose: wiping a whole store should not be one typo away.
        self._delete_prefix(_prefix(prefix, allow_root=False))

    # ---- one writer per prefix ----

    @contextlib.contextmanager
    def lease(self, prefix: str, purpose: str = "a writer",
              advice: str = "wait for that writer to finish, or write elsewhere") -> Iterator[Lease]:
        """Hold the write lease of ``prefix`` for the block: the one-writer rule across threads, processes
        and hosts (see ``shared.storage.lease``). Raises LeaseConflict (FAILED_PRECONDITION) naming the
        holder, then ``advice``, when another writer has it; a thread that holds it already re-enters it."""
        prefix = _prefix(prefix, allow_root=False)
        key = _join(prefix, LEASE_NAME)
        where = f"{self.url.rstrip('/')}/{key}"
        entry = held.leases.get(where)
        if entry is not None:
            entry[1] += 1
            try:
                yield entry[0]
            finally:
                entry[1] -= 1
            return
        with _disk_full_is_resource_exhausted(where):
            lease = Lease(self, prefix, key, purpose, self.lease_ttl, advice).acquire()
        held.leases[where] = [lease, 1]
        try:
            yield lease
        finally:
            del held.leases[where]
            lease.release()

    # ---- publishing ----

    def publish(
        self,
        prefix: str,
        files: Mapping[str, bytes | os.PathLike],
        meta: dict[str, Any] | None = None,
        overwrite: bool = False,
    ) -> Manifest:
        """Upload ``files`` (relative path -> bytes or local path) under ``prefix``, then its manifest.

        Re-publishing an existing prefix needs ``overwrite=True``; the old manifest is removed
        first so no reader pairs it with the new files. The writer holds the prefix's lease throughout,
        and a publish that fails (a full disk...) removes the files it wrote, so nothing half-written stays.
        """
        prefix = _prefix(prefix, allow_root=False)
        if not files:
            raise InvalidArgument(f"publish {prefix!r}: no files given")
        for rel in files:
            validate_key(rel, "file path")
            if rel == MANIFEST_NAME:
                raise InvalidArgument(f"publish {prefix!r}: {MANIFEST_NAME} is written by the store itself")
        manifest_key = _join(prefix, MANIFEST_NAME)
        with self.lease(prefix, purpose=f"publish {prefix}") as lease:
            if self._exists(manifest_key):
                if not overwrite:
                    raise AlreadyExists(f"{prefix!r} is already published in {self.url}")
                self._delete(manifest_key)

            entries: dict[str, FileEntry] = {}
            written: list[str] = []
            try:
                for rel, content in files.items():
                    key = _join(prefix, rel)
                    written.append(key)
                    with _disk_full_is_resource_exhausted(f"{self.url}/{key}"):
                        if isinstance(content, (bytes, bytearray, memoryview)):
                            content = bytes(content)
                            entries[rel] = hash_bytes(content)
                            self._write_bytes(key, content)
                        else:
                            path = pathlib.Path(content)
                            if not path.is_file():
                                raise NotFound(f"publish {prefix!r}: local file {path} does not exist")
                            with path.open("rb") as f:
                                entries[rel] = hash_stream(f)
                            self._write_file(key, path)
                manifest = Manifest(files=entries, meta=dict(meta or {}), created=now_iso())
                lease.ensure()
                with _disk_full_is_resource_exhausted(f"{self.url}/{manifest_key}"):
                    self._write_bytes(manifest_key, manifest.to_json())
            except BaseException:
                for key in written:  # best effort: give the space back, leave no torn prefix
                    with contextlib.suppress(Exception):
                        self._delete(key)
                raise
        log.info(
            "published",
            extra={"store": self.url, "prefix": prefix, "files": len(entries), "bytes": manifest.total_size},
        )
        return manifest

    def publish_dir(
        self,
        prefix: str,
        local_dir: str | os.PathLike,
        meta: dict[str, Any] | None = None,
        overwrite: bool = False,
    ) -> Manifest:
        """Publish every regular file below ``local_dir`` (recursively) under ``prefix``."""
        root = pathlib.Path(local_dir)
        if not root.is_dir():
            raise NotFound(f"local directory {root} does not exist")
        files = {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*"))
                 if p.is_file() and not is_reserved(p.name)}
        if not files:
            raise InvalidArgument(f"local directory {root} has no files to publish")
        return self.publish(prefix, files, meta=meta, overwrite=overwrite)

    def is_published(self, prefix: str) -> bool:
        return self._exists(_join(_prefix(prefix, allow_root=False), MANIFEST_NAME))

    def read_manifest(self, prefix: str) -> Manifest:
        prefix = _prefix(prefix, allow_root=False)
        key = _join(prefix, MANIFEST_NAME)
        try:
            with self._open(key) as f:
                data = f.read()
        except NotFound:
            raise NotFound(f"{prefix!r} is not published in {self.url} (no {MANIFEST_NAME})") from None
        return Manifest.from_json(data, where=f"{self.url}/{key}")

    def list_published(self, prefix: str = "") -> list[str]:
        """Published prefixes at or below ``prefix`` (any depth), sorted: ``["models/m/1", ...]``."""
        suffix = "/" + MANIFEST_NAME
        return [k[: -len(suffix)] for k in self.list(prefix) if k.endswith(suffix)]

    def get_verified(self, prefix: str, relpath: str) -> bytes:
        """Read one file of a published prefix, checking it against the manifest."""
        manifest = self.read_manifest(prefix)
        entry = _entry(manifest, prefix, relpath)
        key = _join(prefix.rstrip("/"), relpath)
        try:
            data = self.get_bytes(key)
        except NotFound:
            # The manifest promises the file: its absence is damage, not a missing dataset.
            raise IntegrityError(f"{self.url}/{key} is listed in the manifest of {prefix!r} but missing") from None
        check_entry(entry, hash_bytes(data), f"{self.url}/{key}")
        return data

    def verify(self, prefix: str) -> Manifest:
        """Check every file of a published prefix against its manifest (streamed, nothing kept); raises
        IntegrityError naming the first file that is missing or differs."""
        manifest = self.read_manifest(prefix)
        prefix = prefix.rstrip("/")
        for rel, entry in sorted(manifest.files.items()):
            validate_key(rel, "manifest file path")
            key = _join(prefix, rel)
            try:
                with self._open(key) as f:
                    actual = hash_stream(f)
            except NotFound:
                raise IntegrityError(f"{self.url}/{key} is listed in the manifest of {prefix!r} but missing") from None
            check_entry(entry, actual, f"{self.url}/{key}")
        return manifest

    def download_dir(self, prefix: str, local_dir: str | os.PathLike) -> pathlib.Path:
        """Download every file of a published prefix into ``local_dir``, verifying each one."""
        manifest = self.read_manifest(prefix)
        prefix = prefix.rstrip("/")
        root = pathlib.Path(local_dir)
        for rel, entry in sorted(manifest.files.items()):
            validate_key(rel, "manifest file path")  # a tampered manifest must not write outside root
            key = _join(prefix, rel)
            with self._open(key) as src:
                actual = _atomic_write_stream(src, root / rel, expected=entry, where=f"{self.url}/{key}")
            log.debug("downloaded", extra={"key": key, "bytes": actual.size})
        return root

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


def _entry(manifest: Manifest, prefix: str, relpath: str) -> FileEntry:
    validate_key(relpath, "file path")
    try:
        return manifest.files[relpath]
    except KeyError:
        raise NotFound(f"{relpath!r} is not listed in the manifest of {prefix!r}") from None


def _atomic_write_stream(
    src: BinaryIO, dest: pathlib.Path, expected: FileEntry | None = None, where: str = ""
) -> FileEntry:
    """Copy ``src`` to ``dest`` through a temp file in the same directory, hashing on the way.

    With ``expected`` the temp file is discarded (and IntegrityError raised) on a mismatch, so a
    corrupt download never lands under its real name.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            actual = hash_stream(src, sink=out)
        if expected is not None:
            check_entry(expected, actual, where or str(dest))
        os.replace(tmp, dest)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    return actual

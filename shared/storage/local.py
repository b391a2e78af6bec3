"""Local-directory backend: the embedded default when no object store is configured."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator
from typing import BinaryIO

from shared.errors import FailedPrecondition, NotFound
from shared.storage.base import TEMP_PREFIX, ArtifactStore


def _write_all(f, data) -> None:
    """Write all of ``data`` to the unbuffered file ``f``: a short write (the disk filling up) is followed
    by another, which then fails with ENOSPC rather than leaving a short file."""
    view = memoryview(data)
    while view:
        view = view[f.write(view):]


def _discard(f, tmp: str) -> None:
    """Drop a staged write that failed (unbuffered, so closing it writes nothing more)."""
    with contextlib.suppress(OSError):
        f.close()
    pathlib.Path(tmp).unlink(missing_ok=True)


class LocalStore(ArtifactStore):
    def __init__(self, root: str | os.PathLike):
        self.root = pathlib.Path(root).expanduser().resolve()
        if self.root.exists() and not self.root.is_dir():
            raise FailedPrecondition(f"store root {self.root} exists and is not a directory")
        # Created by the first write, not here: opening a store to read must not create folders.
        self.url = f"file://{self.root}"

    def _path(self, key: str) -> pathlib.Path:
        return self.root / key

    def _stage(self, key: str) -> tuple[pathlib.Path, int, str]:
        dest = self._path(key)
        if dest.is_dir():
            raise FailedPrecondition(
                f"{key!r} is a directory of keys in {self.url}; cannot write a file there"
            )
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=dest.parent)
        return dest, fd, tmp

    def _commit(self, fd_file, tmp: str, dest: pathlib.Path) -> None:
        # fsync before the rename so a crash cannot leave a renamed-but-empty file behind.
        os.fsync(fd_file.fileno())
        fd_file.close()
        os.replace(tmp, dest)

    def _write_bytes(self, key: str, data: bytes) -> None:
        dest, fd, tmp = self._stage(key)
        f = os.fdopen(fd, "wb", buffering=0)
        try:
            _write_all(f, data)
            self._commit(f, tmp, dest)
        except BaseException:
            _discard(f, tmp)
            raise

    def _write_file(self, key: str, path: pathlib.Path) -> None:
        dest, fd, tmp = self._stage(key)
        f = os.fdopen(fd, "wb", buffering=0)
        try:
            with path.open("rb") as src:
                while chunk := src.read(1 << 20):
                    _write_all(f, chunk)
            self._commit(f, tmp, dest)
        except BaseException:
            _discard(f, tmp)
            raise

    def _open(self, key: str) -> BinaryIO:
        try:
            return self._path(key).open("rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"{key!r} does not exist in {self.url}") from None

    def _list(self, prefix: str) -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return []
        keys = []
        for dirpath, _dirs, names in os.walk(base):
            rel_dir = pathlib.Path(dirpath).relative_to(self.root).as_posix()
            for name in names:
                if not name.startswith(TEMP_PREFIX):
                    keys.append(name if rel_dir == "." else f"{rel_dir}/{name}")
        return keys

    def _exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def _delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, NotADirectoryError):
            self._path(key).unlink()

    def _delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix)
        if path.is_dir():
            shutil.rmtree(path)

    # ---- leases: compare-and-swap under an flock of the lease's directory ----

    @contextlib.contextmanager
    def _guard(self, key: str) -> Iterator[pathlib.Path]:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # held for a read and a rename, released when fd closes
            yield path
        finally:
            os.close(fd)

    @staticmethod
    def _read_versioned(path: pathlib.Path) -> tuple[bytes, str] | None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest()

    def _lease_read(self, key: str) -> tuple[bytes, str] | None:
        with self._guard(key) as path:
            return self._read_versioned(path)

    def _lease_write(self, key: str, data: bytes, version: str | None) -> str | None:
        with self._guard(key) as path:
            current = self._read_versioned(path)
            if (current[1] if current else None) != version:
                return None
            self._write_bytes(key, data)
            return hashlib.sha256(data).hexdigest()

    def _lease_delete(self, key: str, version: str) -> None:
        with self._guard(key) as path:
            current = self._read_versioned(path)
            if current is not None and current[1] == version:
                path.unlink()

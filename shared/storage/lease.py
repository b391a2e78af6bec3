"""One writer per prefix, across threads, processes, hosts and replicas: a lease object in the prefix.

A writer holds ``<prefix>/.tylease``: JSON naming its holder (host, pid, the process's start time, a
random token), what it is doing and, where leases expire, until when. The lease is created with a
create-if-absent write and replaced or removed only by a compare-and-swap on the version its holder last
saw, so of two contenders exactly one wins, and a writer that lost its lease notices before it publishes
(``Lease.ensure``). Stale leases are taken over:

- a holder on this host whose process is gone (no such pid, or the pid now belongs to a process that
  started at another time) is stale at once, on either backend;
- on S3, where a holder on another host cannot be checked, a lease expires ``ttl`` seconds after its
  last renewal; a background thread renews it every ``ttl / 3`` while the writer lives.

Local leases do not expire: on one host the process table is exact, and no renewal thread runs (a thread
would make ``shared.parallel.pool_context`` give up fork for the render pools). A local lease left by a
process on another host (a shared filesystem) is named in the error with the file to delete.

Backends implement the three conditional primitives (``_lease_read``, ``_lease_write``, ``_lease_delete``);
everything else is here, once.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

import psutil

from shared.errors import FailedPrecondition
from shared.logs import get_logger

if TYPE_CHECKING:
    from shared.storage.base import ArtifactStore

log = get_logger(__name__)

LEASE_NAME = ".tylease"
# Seconds an S3 lease lives without renewal: long enough to ride out a slow request, short enough that a
# crashed writer's output is free again within a minute.
DEFAULT_TTL = 60.0
_ATTEMPTS = 5


class LeaseConflict(FailedPrecondition):
    """The prefix is being written by someone else (or this writer lost its lease)."""


def _iso(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.UTC).isoformat(timespec="seconds")


def _process_started(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:
        return -1.0  # alive, start time unknown


_HOST = socket.gethostname()


def holder_alive(holder: dict[str, Any]) -> bool | None:
    """Whether the process a lease names still runs: None when it ran on another host (unknowable)."""
    if holder.get("host") != _HOST:
        return None
    started = _process_started(int(holder.get("pid", -1)))
    if started is None:
        return False
    # A recycled pid belongs to a process that started at another time.
    return started < 0 or abs(started - float(holder.get("started", 0))) < 1.0


class Lease:
    """A held lease; ``ensure()`` raises LeaseConflict once it is lost. Use ``ArtifactStore.lease``."""

    def __init__(self, store: ArtifactStore, prefix: str, key: str, purpose: str, ttl: float | None,
                 advice: str = ""):
        self.store, self.prefix, self.key, self.purpose, self.ttl = store, prefix, key, purpose, ttl
        self.advice = advice
        self.holder = {"host": _HOST, "pid": os.getpid(), "started": _process_started(os.getpid()),
                       "token": uuid.uuid4().hex, "purpose": purpose, "acquired": _iso(time.time())}
        self.version: str | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()  # renewals and release never interleave
        self._renewer: threading.Thread | None = None

    @property
    def where(self) -> str:
        return f"{self.store.url.rstrip('/')}/{self.prefix}"

    def _doc(self) -> bytes:
        doc = dict(self.holder)
        if self.ttl is not None:
            doc["expires"] = time.time() + self.ttl
            doc["expires_at"] = _iso(doc["expires"])
        return json.dumps(doc, sort_keys=True).encode()

    def acquire(self) -> Lease:
        for _ in range(_ATTEMPTS):
            self.version = self.store._lease_write(self.key, self._doc(), None)
            if self.version is not None:
                break
            current = self.store._lease_read(self.key)
            if current is None:
                continue  # released between our write and our read: try again
            data, version = current
            other = _parse(data)
            stale = self._stale(other)
            if not stale:
                raise LeaseConflict(self._conflict(other))
            self.version = self.store._lease_write(self.key, self._doc(), version)
            if self.version is not None:
                log.warning("took over a stale lease", extra={"where": self.where, "reason": stale,
                                                              "previous_holder": other})
                break
        else:
            raise LeaseConflict(f"{self.where}: the write lease kept changing hands; try again")
        if self.ttl is not None:
            self._renewer = threading.Thread(target=self._renew, name=f"lease-{self.prefix}", daemon=True)
            self._renewer.start()
        return self

    def _stale(self, other: dict[str, Any]) -> str:
        """Why ``other``'s lease may be taken over, or "" when it stands."""
        if not other:
            return "unreadable lease"
        alive = holder_alive(other)
        if alive is False:
            return f"its holder (pid {other.get('pid')} on {other.get('host')}) is gone"
        expires = other.get("expires")
        if expires is not None and float(expires) < time.time():
            return f"it expired at {_iso(float(expires))}"
        return ""

    def _conflict(self, other: dict[str, Any]) -> str:
        who = (f"{other.get('purpose') or 'a writer'} (pid {other.get('pid')} on host {other.get('host')}, "
               f"lease {str(other.get('token', ''))[:8]} taken {other.get('acquired')})")
        if other.get("expires") is not None:
            after = f"its lease lapses at {_iso(float(other['expires']))} unless that writer renews it"
        elif holder_alive(other) is None:
            after = (f"that process runs on another host: if it is gone, delete "
                     f"{self.store.url.rstrip('/')}/{self.key}")
        else:
            after = "that process is running"
        return f"{self.where} is being written by {who}; {after}" + (f". {self.advice}" if self.advice else "")

    def _renew(self) -> None:
        assert self.ttl is not None
        deadline = time.time() + self.ttl
        while not self._stop.wait(self.ttl / 3):
            with self._lock:
                if self._stop.is_set():
                    return
                try:
                    version = self.store._lease_write(self.key, self._doc(), self.version)
                except Exception as exc:  # noqa: BLE001 - an unreachable store is retried until the lease lapses
                    if time.time() > deadline:
                        self.lost = f"the lease could not be renewed before it lapsed ({exc})"
                        return
                    continue
                if version is None:
                    self.lost = "another writer took the lease over"
                    log.error("lease lost", extra={"where": self.where})
                    return
                self.version, deadline = version, time.time() + self.ttl

    def ensure(self) -> None:
        """Raise LeaseConflict unless this writer still holds the lease (call before publishing)."""
        if self.lost is None:
            current = self.store._lease_read(self.key)
            if current is None or current[1] != self.version:
                self.lost = "the lease was removed or taken over by another writer"
        if self.lost is not None:
            raise LeaseConflict(f"{self.where}: this writer lost its write lease ({self.lost}); nothing "
                                "more is written")

    def release(self) -> None:
        self._stop.set()
        with self._lock:
            if self._renewer is not None:
                self._renewer = None
            if self.version is not None and self.lost is None:
                self.store._lease_delete(self.key, self.version)
            self.version = None


def _parse(data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


class _Held(threading.local):
    """The leases this thread holds, by location: a writer that already holds one re-enters it."""

    def __init__(self) -> None:
        self.leases: dict[str, list] = {}


held = _Held()

"""Long work behind a server-streaming progress RPC: one helper for every streaming servicer.

``StreamedJob(work, stage=..., output=...)`` starts ``work(report)`` in a thread at once; iterating the
job yields each ``JobProgress`` the work reports, then one ``JobDone`` with its result. ``job.progress()``
builds the ``trainyard.v1.Progress`` message with the job's id, stage and elapsed time filled in.
"""
from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from shared import deadlines
from shared.errors import FailedPrecondition
from shared.logs import get_logger
from shared.pb import common_pb2
from shared.storage import split_location

log = get_logger(__name__)


@dataclass(frozen=True)
class JobProgress:
    """What work reports while it runs; ``item`` carries a finished piece the stream passes on."""

    done: int = 0
    total: int = 0
    message: str = ""
    item: Any = None


@dataclass(frozen=True)
class JobDone:
    result: Any


Report = Callable[[JobProgress], None]

# Output location -> job id of the work writing it. Work outlives its stream (see StreamedJob), so
# a client that reconnects and asks again must not start a second writer on the same shards.
_writing: dict[str, str] = {}
_writing_lock = threading.Lock()
_DONE = object()


class StreamedJob:
    """Runs ``work(report)`` in a thread; iterate it for the events, in the caller's thread.

    An exception in ``work`` is re-raised by the iterator, so the RPC's error mapping sees it. A caller
    that goes away (``is_active`` turns false) stops the stream, not the work: renders and conversions are
    resumable, and half-stopping one would leave less than its shards already give. A caller's deadline
    (``deadline_s``, as gRPC's ``context.time_remaining()`` gives it) does stop the work, since no one can
    receive the result after it: at the work's next progress report or ``shared.deadlines.check()``, with
    DeadlineExceeded (what it finished, such as a render's complete shards, stays). ``output`` names the
    location the work writes: while it runs, a second job for the same output raises FailedPrecondition
    here, before anything starts.
    """

    def __init__(self, work: Callable[[Report], Any], *, stage: str, output: str | None = None,
                 is_active: Callable[[], bool] = lambda: True, poll_s: float = 0.5,
                 deadline_s: float | None = None):
        self.job_id = uuid.uuid4().hex[:12]
        self.stage = stage
        self._is_active = is_active
        self._poll_s = poll_s
        self._started = time.monotonic()
        self._deadline_at = None if deadline_s is None else self._started + deadline_s
        self._events: queue.Queue = queue.Queue()
        self._outcome: dict[str, Any] = {}
        # split_location spells one location one way: file:// or not, trailing slash or not, relative or not.
        self._key = "/".join(split_location(output)) if output else None
        if self._key is not None:
            with _writing_lock:
                if self._key in _writing:
                    raise FailedPrecondition(
                        f"{output} is being written by job {_writing[self._key]} already; wait for it to finish, "
                        "then ask again (with resume to continue it)")
                _writing[self._key] = self.job_id
        threading.Thread(target=self._run, args=(work,), name=f"job-{self.job_id}", daemon=True).start()

    def _run(self, work: Callable[[Report], Any]) -> None:
        try:
            with deadlines.client_deadline_at(self._deadline_at):
                self._outcome["result"] = work(self._report)
        except deadlines.DeadlineExceeded as exc:
            log.warning("job stopped: its client's deadline passed", extra={"job_id": self.job_id, "stage": self.stage})
            self._outcome["error"] = exc
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer thread
            self._outcome["error"] = exc
        finally:
            if self._key is not None:
                with _writing_lock:
                    _writing.pop(self._key, None)
        self._events.put(_DONE)

    def _report(self, event: JobProgress) -> None:
        deadlines.check()  # work that reports progress stops there once its client's deadline has passed
        self._events.put(event)

    def __iter__(self) -> Iterator[JobProgress | JobDone]:
        while True:
            try:
                item = self._events.get(timeout=self._poll_s)
            except queue.Empty:
                if not self._is_active():
                    return
                continue
            if item is _DONE:
                break
            yield item
        if "error" in self._outcome:
            raise self._outcome["error"]
        yield JobDone(self._outcome.get("result"))

    def progress(self, state: str = "running", stage: str | None = None, **fields: Any) -> common_pb2.Progress:
        """The stream's message: this job's id, ``stage`` (default the job's) and elapsed time, plus ``fields``."""
        return common_pb2.Progress(job_id=self.job_id, state=state, stage=stage or self.stage,
                                   elapsed_seconds=time.monotonic() - self._started, **fields)

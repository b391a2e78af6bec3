"""Long work behind a server-streaming progress RPC: one helper for every streaming servicer.

``StreamedJob(work, stage=..., output=...)`` starts ``work(report)`` in a thread at once; iterating the
job yields each ``JobProgress`` the work reports, then one ``JobDone`` with its result. ``job.progress()``
builds the ``trainyard.v1.Progress`` message with the job's id, stage and elapsed time filled in.

Every job is also kept in a bounded table after its stream ends, with its last progress and, when it failed,
its error, so work that fails after its client went away still leaves a trace: the log line, and the answer
``job_status(job_id | output)`` gives to a service's ``GetJob`` RPC.
"""
from __future__ import annotations

import collections
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from shared import deadlines
from shared.errors import FailedPrecondition, InvalidArgument, NotFound, client_message
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
# Job id -> job, oldest first; finished jobs beyond this many are forgotten (running ones never are).
MAX_FINISHED_JOBS = 256
_jobs: collections.OrderedDict[str, StreamedJob] = collections.OrderedDict()


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
        self.output = output or ""
        # What job_status reports: the last progress, then the outcome.
        self._state, self._done, self._total, self._message = "running", 0, 0, ""
        self._finished: float | None = None
        # split_location spells one location one way: file:// or not, trailing slash or not, relative or not.
        self._key = "/".join(split_location(output)) if output else None
        with _writing_lock:
            if self._key is not None:
                if self._key in _writing:
                    raise FailedPrecondition(
                        f"{output} is being written by job {_writing[self._key]} already; wait for it to finish, "
                        "then ask again (with resume to continue it)")
                _writing[self._key] = self.job_id
            _jobs[self.job_id] = self
        threading.Thread(target=self._run, args=(work,), name=f"job-{self.job_id}", daemon=True).start()

    def _run(self, work: Callable[[Report], Any]) -> None:
        try:
            with deadlines.client_deadline_at(self._deadline_at):
                self._outcome["result"] = work(self._report)
            self._state = "succeeded"
        except deadlines.DeadlineExceeded as exc:
            log.warning("job stopped: its client's deadline passed", extra={"job_id": self.job_id, "stage": self.stage})
            self._outcome["error"] = exc
            self._state, self._message = "cancelled", f"stopped: {exc}"
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer thread
            self._outcome["error"] = exc
            self._state, self._message = "failed", client_message(f"{type(exc).__name__}: {exc}")
            # Logged here, not only by the RPC: a client that went away would otherwise leave no trace of it.
            log.error("job failed", extra={"job_id": self.job_id, "stage": self.stage, "output": self.output,
                                           "error": self._message, "client_connected": self._is_active()})
        finally:
            self._finished = time.monotonic()
            with _writing_lock:
                if self._key is not None:
                    _writing.pop(self._key, None)
                _forget_old_jobs()
        self._events.put(_DONE)

    def _report(self, event: JobProgress) -> None:
        deadlines.check()  # work that reports progress stops there once its client's deadline has passed
        self._done, self._total = event.done, event.total
        self._events.put(event)

    def status(self) -> common_pb2.Progress:
        """The job as ``GetJob`` reports it: its last progress, then how it ended."""
        end = self._finished if self._finished is not None else time.monotonic()
        return common_pb2.Progress(job_id=self.job_id, state=self._state, stage=self.stage, done=self._done,
                                   total=self._total, elapsed_seconds=end - self._started, message=self._message,
                                   outputs={"output": self.output} if self.output else {})

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


def _forget_old_jobs() -> None:
    """Drop the oldest finished jobs beyond MAX_FINISHED_JOBS (call with ``_writing_lock`` held)."""
    finished = [jid for jid, job in _jobs.items() if job._finished is not None]
    for jid in finished[:max(0, len(finished) - MAX_FINISHED_JOBS)]:
        del _jobs[jid]


def job_status(job_id: str = "", output: str = "") -> common_pb2.Progress:
    """A job of this process by its id, or the newest one that wrote ``output``; see the module docstring."""
    if bool(job_id) == bool(output):
        raise InvalidArgument("give either a job id or an output location")
    with _writing_lock:
        jobs = list(_jobs.values())
    if job_id:
        found = next((j for j in jobs if j.job_id == job_id), None)
    else:
        key = "/".join(split_location(output))
        found = next((j for j in reversed(jobs) if j._key == key), None)
    if found is None:
        raise NotFound(f"no job {job_id or 'writing ' + output} on this server (it keeps the last "
                       f"{MAX_FINISHED_JOBS} finished jobs, until it restarts)")
    return found.status()

"""Turn a long call with a progress callback into a stream, for server-streaming progress RPCs."""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator

from shared.errors import FailedPrecondition
from shared.storage import split_location

_DONE = object()

# Output location -> job id of the work writing it. Work outlives its stream (see stream_progress), so
# a client that reconnects and asks again must not start a second writer on the same shards.
_writing: dict[str, str] = {}
_writing_lock = threading.Lock()


def stream_progress(work: Callable[[Callable[..., None]], Any], poll_s: float = 0.5,
                    is_active: Callable[[], bool] = lambda: True, output: str | None = None,
                    job_id: str = "") -> Iterator[tuple[str, Any]]:
    """Start ``work(report)`` in a thread now; the returned iterator yields ("progress", args) per
    ``report(*args)``, then ("done", result).

    An exception in ``work`` is re-raised by the iterator, in the caller's thread, so the RPC's error
    mapping sees it. A caller that goes away stops the stream, not the work: renders and conversions are
    resumable, and half-stopping one would leave less than its shards already give. ``output`` names the
    location the work writes: while it runs, a second call for the same output raises FailedPrecondition
    here, before anything starts.
    """
    # split_location spells one location one way: file:// or not, trailing slash or not, relative or not.
    key = "/".join(split_location(output)) if output else None
    if key is not None:
        with _writing_lock:
            if key in _writing:
                raise FailedPrecondition(
                    f"{output} is being written by job {_writing[key]} already; wait for it to finish, "
                    "then ask again (with resume to continue it)")
            _writing[key] = job_id or "?"
    events: queue.Queue = queue.Queue()
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = work(lambda *args: events.put(args))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer thread
            outcome["error"] = exc
        finally:
            if key is not None:
                with _writing_lock:
                    _writing.pop(key, None)
        events.put(_DONE)

    threading.Thread(target=run, name="progress-work", daemon=True).start()
    return _drain(events, outcome, poll_s, is_active)


def _drain(events: queue.Queue, outcome: dict[str, Any], poll_s: float,
           is_active: Callable[[], bool]) -> Iterator[tuple[str, Any]]:
    while True:
        try:
            item = events.get(timeout=poll_s)
        except queue.Empty:
            if not is_active():
                return
            continue
        if item is _DONE:
            break
        yield "progress", item
    if "error" in outcome:
        raise outcome["error"]
    yield "done", outcome.get("result")

"""Turn a long call with a progress callback into a stream, for server-streaming progress RPCs."""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator

_DONE = object()


def stream_progress(work: Callable[[Callable[..., None]], Any], poll_s: float = 0.5,
                    is_active: Callable[[], bool] = lambda: True) -> Iterator[tuple[str, Any]]:
    """Run ``work(report)`` in a thread; yield ("progress", args) per ``report(*args)``, then ("done", result).

    An exception in ``work`` is re-raised here, in the caller's thread, so the RPC's error mapping
    sees it. A caller that goes away stops the stream, not the work: renders and conversions are
    resumable, and half-stopping one would leave less than its shards already give.
    """
    events: queue.Queue = queue.Queue()
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = work(lambda *args: events.put(args))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer thread
            outcome["error"] = exc
        events.put(_DONE)

    threading.Thread(target=run, name="progress-work", daemon=True).start()
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

"""Deadlines that long work checks between its steps: a client's deadline and per-item time budgets.

Work that loops over items (models, shards) calls ``check()`` where stopping is safe. Limits nest in a
context variable, so every thread sees its own: ``StreamedJob`` runs its work inside
``client_deadline_at(instant)`` and a per-item loop wraps each item in ``budget(seconds, what)``.
``check()`` raises the outermost limit that has passed: ``DeadlineExceeded`` (nobody is waiting for
the result any more, so the whole job stops) before ``BudgetExceeded`` (this item took too long: it is
recorded as failed and the loop goes on). Python cannot interrupt a running step, so a step overruns
a limit by at most its own length.

Process pools carry the client's deadline into their workers: pass ``current_deadline()`` to the
pool's initializer and call ``carry(at)`` there. ``time.monotonic`` is system-wide, so an instant
means the same in every process of the machine.
"""
from __future__ import annotations

import contextvars
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import grpc

from shared.errors import Cancelled, ResourceExhausted, TrainyardError


class DeadlineExceeded(Cancelled):
    """The client's deadline passed: the work stops, since no one can receive its result."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class BudgetExceeded(ResourceExhausted):
    """One item of a larger piece of work used up its time budget."""


@dataclass(frozen=True)
class _Limit:
    at: float  # time.monotonic() instant
    error: Callable[[], TrainyardError]
    client: bool  # the client's deadline (the job's), not an item's budget


_limits: contextvars.ContextVar[tuple[_Limit, ...]] = contextvars.ContextVar("trainyard_deadlines", default=())


def check() -> None:
    """Raise the outermost limit that has passed; cheap enough to call once per curve."""
    limits = _limits.get()
    if limits:
        now = time.monotonic()
        for limit in limits:
            if now >= limit.at:
                raise limit.error()


def current_deadline() -> float | None:
    """The client's deadline in force here (a ``time.monotonic`` instant), or None."""
    return next((limit.at for limit in _limits.get() if limit.client), None)


@contextmanager
def _entered(limit: _Limit) -> Iterator[None]:
    token = _limits.set((*_limits.get(), limit))
    try:
        yield
    finally:
        _limits.reset(token)


def _deadline_passed() -> TrainyardError:
    return DeadlineExceeded("the client's deadline passed, so the work was stopped")


def client_deadline_at(at: float | None) -> AbstractContextManager[None]:
    """Work inside stops with DeadlineExceeded at the ``time.monotonic`` instant ``at`` (None: never)."""
    return nullcontext() if at is None else _entered(_Limit(at, _deadline_passed, client=True))


def carry(at: float | None) -> None:
    """The client's deadline ``at`` for the rest of this thread: a pool worker's initializer calls it."""
    if at is not None:
        _limits.set((*_limits.get(), _Limit(at, _deadline_passed, client=True)))


def budget(seconds: float, what: str) -> AbstractContextManager[None]:
    """Work inside fails with BudgetExceeded once it has run ``seconds``; ``what`` names it in the message."""
    def error() -> TrainyardError:
        return BudgetExceeded(f"{what} took longer than its time budget of {seconds:g} s")

    return _entered(_Limit(time.monotonic() + seconds, error, client=False))

"""Holding a server's work at a chosen item, to test what happens around it.

A FIFO in place of an input file blocks the server's read of it until the test writes the content,
so the work waits at that item for exactly as long as the test wants (a client's deadline to pass,
say) without slow inputs.
"""
from __future__ import annotations

import errno
import logging
import os
import time
from pathlib import Path

import grpc
import pytest


def feed_gate(path: Path, data: bytes, timeout: float = 30.0) -> None:
    """Write ``data`` into the FIFO ``path`` as soon as the server has opened it for reading."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO while no reader has it open
            break
        except OSError as exc:
            if exc.errno != errno.ENXIO or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    os.set_blocking(fd, True)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _deadline_record(caplog: pytest.LogCaptureFixture, job_id: str, timeout: float = 30.0) -> logging.LogRecord:
    """The server's log record that job ``job_id`` stopped at its client's deadline (waits for it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in caplog.records:
            if getattr(record, "job_id", None) == job_id and "deadline" in record.getMessage():
                return record
        time.sleep(0.05)
    raise AssertionError(f"no record of job {job_id} stopping at its client's deadline")


def stop_at_gate(call: grpc.Call, gate: Path, data: bytes, caplog: pytest.LogCaptureFixture) -> logging.LogRecord:
    """Let a streaming ``call`` made with a short timeout run out of time while its server waits at
    ``gate``, then feed the gate: returns the server's record that the job stopped at its client's deadline."""
    job_id = next(call).job_id
    with pytest.raises(grpc.RpcError) as err:
        list(call)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    caplog.set_level(logging.WARNING, logger="shared.streaming")
    time.sleep(0.5)  # the server's copy of the deadline ends a moment after the client's
    feed_gate(gate, data)
    return _deadline_record(caplog, job_id)

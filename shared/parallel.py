"""Process helpers shared by every module that starts processes: the pool start method, liveness."""
from __future__ import annotations

import multiprocessing
import os
import sys
import threading


def pool_context() -> multiprocessing.context.BaseContext:
    """fork when it is safe, forkserver otherwise.

    A forked child inherits only the forking thread: a lock another thread held at that moment (a
    gRPC server's, torch's thread pools) stays locked forever in the child, which then hangs or
    crashes. So fork only from a single-threaded process that has not loaded torch (the CLI), and use
    forkserver inside services and anything that imported torch.
    """
    if sys.platform == "linux" and threading.active_count() == 1 and "torch" not in sys.modules:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("forkserver" if sys.platform == "linux" else "spawn")


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs; an exited child of ours is reaped first so a zombie does not count."""
    if pid <= 0:
        return False
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

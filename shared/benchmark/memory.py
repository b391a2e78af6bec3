"""Peak inference memory of a model, without the interpreter's and libraries' own pages."""
from __future__ import annotations

import resource
import threading
from pathlib import Path

import torch
from torch import nn

from shared.errors import FailedPrecondition


def _status_kb(*fields: str) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in fields:
                out[key] = int(line.split()[1])
    except OSError:
        pass
    return out


def anon_rss_bytes() -> int:
    """Anonymous resident memory (heap, tensors, stacks) of this process.

    File-backed pages are left out on purpose: the first forward pass faults in tens of MB of
    libtorch/oneDNN code, which would otherwise be charged to the model (a 6k-parameter MNIST net showed
    165 MB of "peak memory", almost all of it library code).
    """
    kb = _status_kb("RssAnon", "VmRSS")
    if "RssAnon" in kb:
        return kb["RssAnon"] * 1024
    if "VmRSS" in kb:
        return kb["VmRSS"] * 1024
    # No procfs (macOS): ru_maxrss, in bytes there, is the best available.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class PeakAnonRss:
    """Peak anonymous resident memory over a ``with`` block, from two lower bounds, whichever is higher.

    1. The kernel's high-water mark (reset by writing ``5`` to /proc/self/clear_refs) minus the file-backed
       and shared RSS at the end: exact at the peak as long as no library page was faulted in after it, and
       it catches peaks of any duration.
    2. RssAnon sampled every 1 ms by a thread, which can miss shorter peaks.
    Where clear_refs may not be written only (2) runs; ``method`` says which. Neither sees memory the
    allocator freed before the block and hands out again while still resident, which is why the benchmark
    measures in a fresh process.
    """

    def __init__(self) -> None:
        self.peak = 0
        self.method = ""
        self._hwm = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakAnonRss:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._hwm = {"VmHWM", "RssFile"} <= set(_status_kb("VmHWM", "RssFile"))
        except OSError:
            self._hwm = False
        self.peak = anon_rss_bytes()
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, anon_rss_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, anon_rss_bytes())
        self.method = "anonymous RSS sampled every 1 ms"
        if self._hwm:
            kb = _status_kb("VmHWM", "RssFile", "RssShmem")
            from_hwm = (kb["VmHWM"] - kb["RssFile"] - kb.get("RssShmem", 0)) * 1024
            self.peak = max(self.peak, from_hwm)
            self.method = "anonymous RSS: max of (VmHWM after clear_refs reset - file RSS) and 1 ms samples"


def measure_peak_memory(model: nn.Module, shape: tuple[int, ...], batch_sizes: list[int], device: torch.device,
                        baseline_rss: int) -> tuple[float, str]:
    """Peak inference memory in MB over a batch-1 and a largest-batch forward pass.

    CUDA: ``max_memory_allocated`` after a reset (weights + activations + inputs). CPU: peak RSS during the
    two passes minus the anonymous RSS measured before the model was built, so weights, activations,
    inputs and the allocator's working set count; the interpreter, imported libraries and their code do not.
    """
    sizes = sorted({1, max(batch_sizes)})
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        with torch.inference_mode():
            for bs in sizes:
                model(torch.randn(bs, *shape, device=device))
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        method = f"torch.cuda.max_memory_allocated after reset, batches {sizes}"
    else:
        with PeakAnonRss() as probe, torch.inference_mode():
            for bs in sizes:
                model(torch.randn(bs, *shape))
        peak = probe.peak - baseline_rss
        method = f"peak {probe.method}, during batches {sizes}, minus anonymous RSS before model build"
    if peak <= 0:
        raise FailedPrecondition(f"measured peak memory is {peak} bytes ({method}); refusing to report it")
    return peak / 2**20, method

"""A fingerprint of the machine a benchmark ran on, so numbers are only compared like with like."""
from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

from pydantic import BaseModel


class HardwareInfo(BaseModel):
    cpu: str
    logical_cpus: int
    # CPUs this process may run on (cgroup / affinity limits make this smaller than logical_cpus).
    usable_cpus: int
    torch_threads: int
    torch_version: str
    python: str
    platform: str
    gpu: str = ""
    cuda: str = ""

    @property
    def digest(self) -> str:
        """Short hash of the fields that change timings; two runs with equal digests are comparable."""
        keys = ("cpu", "usable_cpus", "torch_threads", "torch_version", "gpu", "cuda")
        blob = json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo; platform.processor() where that file is absent."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def fingerprint(device: str = "cpu") -> HardwareInfo:
    """Describe this process's hardware; ``torch_threads`` is the intra-op thread count in effect now."""
    import torch

    gpu = cuda = ""
    if device.startswith("cuda") and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(torch.device(device))
        cuda = torch.version.cuda or ""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    return HardwareInfo(
        cpu=cpu_model(),
        logical_cpus=os.cpu_count() or 1,
        usable_cpus=usable,
        torch_threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        python=platform.python_version(),
        platform=platform.platform(),
        gpu=gpu,
        cuda=cuda,
    )

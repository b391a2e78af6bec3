"""All measurements of one model, run inside a fresh subprocess.

``measure_in_subprocess(spec)`` runs ``python -m shared.benchmark.measure SPEC.json RESULT.json``, which reads
a ``MeasureSpec``, measures the model and writes a ``ModelResult``. A fresh process per model is what makes the
CPU peak-memory figure the model's own (nothing from an earlier model is resident) and lets the thread count
be set before any kernel runs. The benchmark service and the train service's study trials both measure
through here, so a study row holds the same figures ``trainyard bench`` prints.

Order matters: memory is measured first, right after the model is built, so the FLOP counter, the latency
loops and the int8 copy cannot raise the high-water mark. Each later stage records its own error and the
others still run, so one failing stage never blanks the whole row. FLOPs follow timm's convention
(``shared.benchmark.flops``); the int8 model is ``shared.quantize.quantize_int8``'s, the one the inference
server serves with ``--quantize``.
"""
from __future__ import annotations

import importlib
import io
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, Field
from torch import nn

from shared.benchmark.flops import FLOPS_CONVENTION, count_flops
from shared.benchmark.hardware import HardwareInfo, fingerprint
from shared.benchmark.memory import anon_rss_bytes, measure_peak_memory
from shared.errors import FailedPrecondition, InvalidArgument, NotFound
from shared.logs import configure, get_logger
from shared.preprocess import Preprocessor
from shared.quantize import quantize_int8

log = get_logger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]

class MeasureSpec(BaseModel):
    """What the subprocess measures for one model (built by the runner from a BenchRequest)."""

    model: str
    # One sample's forward input: (C, H, W) for images, (cameras, C, T, H, W) for the trajectory models.
    input_shape: tuple[int, ...] | None = None
    num_classes: int | None = None
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 32])
    warmup: int = 10
    iterations: int = 50
    throughput_seconds: float = 2.0
    threads: int | None = None
    device: str = "cpu"
    quantize: bool = True
    dataset: str | None = None
    dataset_limit: int = 2000


class ModelResult(BaseModel):
    """Every figure for one model; a ``*_error`` field explains each figure that could not be measured."""

    model: str
    device: str = "cpu"
    input_shape: list[int] = Field(default_factory=list)
    num_classes: int | None = None
    # Set when the model could not be measured at all (unknown name, forward raised, subprocess died).
    error: str | None = None

    params_total: int | None = None
    params_trainable: int | None = None

    gmacs: float | None = None
    gflops: float | None = None
    gmacs_by_op: dict[str, float] = Field(default_factory=dict)
    counted_ops: list[str] = Field(default_factory=list)
    flops_convention: str = FLOPS_CONVENTION
    flops_error: str | None = None

    latency_p50_ms: float | None = None
    latency_p90_ms: float | None = None
    latency_p99_ms: float | None = None
    latency_mean_ms: float | None = None
    latency_iterations: int = 0
    # Median process CPU time per batch-1 call (all threads), and CPU time / (wall time x threads) over the
    # loop: far below 1 means the process waited for cores and the wall-clock figures are inflated.
    latency_cpu_p50_ms: float | None = None
    cpu_share: float | None = None
    latency_note: str = ""
    threads: int | None = None
    latency_error: str | None = None

    # batch size -> samples per second
    throughput: dict[int, float] = Field(default_factory=dict)
    throughput_error: str | None = None

    peak_memory_mb: float | None = None
    peak_memory_method: str = ""
    memory_error: str | None = None

    size_fp32_mb: float | None = None
    size_int8_mb: float | None = None
    int8_quantized_layers: int | None = None
    int8_latency_p50_ms: float | None = None
    int8_note: str = ""
    quant_error: str | None = None

    accuracy_fp32: float | None = None
    accuracy_int8: float | None = None
    accuracy_delta: float | None = None
    accuracy_samples: int | None = None
    accuracy_error: str | None = None

    # Text generators (captioning models): greedy decoding of one image, wall time per generated token.
    ms_per_token: float | None = None
    generation_error: str | None = None

    hardware: HardwareInfo | None = None
    mlflow_run_id: str | None = None
    tracking_error: str | None = None
    duration_s: float | None = None

    def metrics(self) -> dict[str, float]:
        """Every measured figure as a flat metric dict (for MLflow)."""
        names = ("gmacs", "gflops", "latency_p50_ms", "latency_p90_ms", "latency_p99_ms", "latency_mean_ms",
                 "latency_cpu_p50_ms", "cpu_share", "peak_memory_mb", "size_fp32_mb", "size_int8_mb",
                 "int8_latency_p50_ms", "accuracy_fp32", "accuracy_int8", "accuracy_delta", "ms_per_token")
        out = {n: float(getattr(self, n)) for n in names if getattr(self, n) is not None}
        if self.params_total is not None:
            out["params_m"] = self.params_total / 1e6
            out["params_trainable_m"] = (self.params_trainable or 0) / 1e6
        out.update({f"throughput_bs{bs}": v for bs, v in self.throughput.items()})
        return out


# --------------------------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_batch1(model: nn.Module, shape: tuple[int, ...], device: torch.device, warmup: int,
                iterations: int) -> tuple[np.ndarray, np.ndarray]:
    """Wall-clock and process-CPU ms of ``iterations`` batch-1 forward passes after ``warmup`` untimed ones.

    The CPU time is what tells a busy machine from a slow model: a process that waits for a core
    accumulates wall time but no CPU time.
    """
    x = torch.randn(1, *shape, device=device)
    wall, cpu = np.empty(iterations), np.empty(iterations)
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        _sync(device)
        for i in range(iterations):
            start, start_cpu = time.perf_counter(), time.process_time()
            model(x)
            _sync(device)
            wall[i] = (time.perf_counter() - start) * 1e3
            cpu[i] = (time.process_time() - start_cpu) * 1e3
    return wall, cpu


# Below this share of its threads' CPU during the latency loop, the machine was busy and the wall-clock
# latencies are inflated by waiting for a core.
BUSY_CPU_SHARE = 0.9


def time_generation(model: nn.Module, shape: tuple[int, ...], device: torch.device, tokens: int = 64,
                    repeats: int = 3) -> float:
    """Median ms per generated token of greedy decoding for one image (``tokens`` steps from BOS, EOS never
    matched so every run decodes all of them): the encoder once, then one decoder step per token."""
    x = torch.randn(1, *shape, device=device)
    per_token = []
    with torch.inference_mode():
        model.generate(x, max_new_tokens=4, eos_id=-1)  # warm-up
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            out = model.generate(x, max_new_tokens=tokens, eos_id=-1)
            _sync(device)
            per_token.append(1000 * (time.perf_counter() - t0) / out.shape[1])
    return float(np.median(per_token))


def measure_throughput(model: nn.Module, shape: tuple[int, ...], batch_size: int, device: torch.device,
                       min_seconds: float, min_iterations: int = 2) -> float:
    """Samples/s at ``batch_size``: timed passes until both ``min_seconds`` and ``min_iterations`` are met."""
    x = torch.randn(batch_size, *shape, device=device)
    with torch.inference_mode():
        # Each new input shape builds its own kernels/primitives; keep that out of the timing.
        model(x)
        _sync(device)
        done = 0
        start = time.perf_counter()
        while True:
            model(x)
            done += 1
            _sync(device)
            elapsed = time.perf_counter() - start
            if done >= min_iterations and elapsed >= min_seconds:
                return done * batch_size / elapsed


# --------------------------------------------------------------------------------------------- sizes


def fp32_size_bytes(model: nn.Module) -> int:
    """Bytes of the model's safetensors file, as the exporter writes it (shared tensors stored once)."""
    from safetensors.torch import save_model

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        save_model(model, str(path))
        return path.stat().st_size


def state_dict_bytes(model: nn.Module) -> int:
    # Quantized packed params are not safetensors-serialisable; torch.save to memory measures the same
    # payload and nothing is ever loaded back from it.
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


# --------------------------------------------------------------------------------------------- accuracy


def load_eval_set(path: str, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``limit`` test images (uint8 N, C, H, W) and labels of an MNIST IDX or CIFAR-10 dir."""
    root = Path(path)
    if not root.is_dir():
        raise NotFound(f"dataset directory {path} does not exist")
    names = {p.name for p in root.iterdir()}
    if any("idx" in n for n in names):
        from shared.data.mnist import read_mnist

        _, test = read_mnist(root)
    elif "test_batch" in names:
        from shared.data.cifar import read_cifar10

        _, test = read_cifar10(root)
    else:
        raise InvalidArgument(f"dataset {path}: expected MNIST IDX files or CIFAR-10 python batches")
    return test.images[:limit], test.labels[:limit]


def top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            correct += (model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum().item()
    return 100.0 * correct / len(x)

# --------------------------------------------------------------------------------------------- model


def import_builder(spec: MeasureSpec) -> Callable[[], tuple[nn.Module, tuple[int, ...], Preprocessor | None]]:
    """Import everything building ``spec``'s model needs and return the build step, which gives the model,
    its input shape and the preprocessing its accuracy is measured with (a published model's card's; plain
    [0, 1] scaling for a zoo model; None for inputs that are not images).

    Split from the build so the memory baseline is read after these imports: a first import of timm or
    the store client would otherwise be charged to the model.
    """
    name = spec.model
    if name.startswith("store:"):
        # shared.models (timm, ~100 MB of anonymous memory on import) is what rebuilding the model imports:
        # imported here, before the baseline, so it is not charged to the model.
        import shared.models  # noqa: F401
        from shared.modelcard import load_published, parse_model_ref
        from shared.storage import open_store

        ref = parse_model_ref(name)

        def build_published():
            store = open_store()
            model, card = load_published(store, ref.name, ref.resolve(store))
            shape = spec.input_shape or tuple(card.input_size)
            images = len(shape) == 3
            return model, shape, Preprocessor(shape, card.normalization.mean, card.normalization.std) \
                if images else None

        return build_published
    shape = spec.input_shape or (3, 224, 224)
    images = len(shape) == 3
    unit = Preprocessor(shape, [0.0] * shape[0], [1.0] * shape[0]) if images else None
    kwargs = dict(spec.model_kwargs)
    if images:  # image models take their channel count from the input; others define their own input
        kwargs.setdefault("in_chans", shape[0])
    if spec.num_classes is not None:
        kwargs["num_classes"] = spec.num_classes
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise NotFound(f"model factory {name!r} not importable: {exc}") from exc
        return lambda: (factory(**kwargs), shape, unit)
    from shared.models import create_model

    return lambda: (create_model(name, **kwargs), shape, unit)


def _err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def measure_model(spec: MeasureSpec) -> ModelResult:
    """Run every measurement of ``spec`` in this process; see the module docstring for the order."""
    started = time.perf_counter()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    device = torch.device(spec.device)
    result = ModelResult(model=spec.model, device=str(device), num_classes=spec.num_classes,
                         threads=torch.get_num_threads(), hardware=fingerprint(spec.device))

    try:
        build = import_builder(spec)
        baseline_rss = anon_rss_bytes()
        model, shape, preprocess = build()
        model = model.to(device).eval()
        result.input_shape = list(shape)
    except Exception as exc:
        result.error = f"could not build model: {_err(exc)}"
        log.error("model build failed", extra={"model": spec.model, "error": result.error})
        return result

    try:
        result.peak_memory_mb, result.peak_memory_method = measure_peak_memory(
            model, shape, spec.batch_sizes, device, baseline_rss)
    except Exception as exc:
        result.memory_error = _err(exc)
        # Tell "the model cannot run at all" (a fatal row) from "the memory probe or the big batch failed".
        try:
            with torch.inference_mode():
                model(torch.randn(1, *shape, device=device))
        except Exception as forward_exc:
            result.error = f"forward pass failed: {_err(forward_exc)}"
            result.duration_s = time.perf_counter() - started
            return result

    result.params_total = sum(p.numel() for p in model.parameters())
    result.params_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    try:
        flops, by_op = count_flops(model, torch.randn(1, *shape, device=device))
        if flops <= 0:
            raise FailedPrecondition("no counted operator ran in the forward pass (0 FLOPs)")
        result.gflops = flops / 1e9
        result.gmacs = flops / 2e9
        result.gmacs_by_op = {op: n / 2e9 for op, n in by_op.items()}
        result.counted_ops = sorted(by_op)
    except Exception as exc:
        result.flops_error = _err(exc)

    try:
        times, cpu_times = time_batch1(model, shape, device, spec.warmup, spec.iterations)
        result.latency_p50_ms, result.latency_p90_ms, result.latency_p99_ms = (
            float(v) for v in np.percentile(times, [50, 90, 99]))
        result.latency_mean_ms = float(times.mean())
        result.latency_iterations = len(times)
        result.latency_cpu_p50_ms = float(np.median(cpu_times))
        if device.type == "cpu":
            result.cpu_share = float(cpu_times.sum() / times.sum() / result.threads)
            if result.cpu_share < BUSY_CPU_SHARE:
                result.latency_note = (
                    f"busy machine: the process got {result.cpu_share:.0%} of {result.threads} thread(s)' CPU "
                    "while timing, so wall-clock latencies are inflated")
    except Exception as exc:
        result.latency_error = _err(exc)

    errors = []
    for bs in spec.batch_sizes:
        try:
            result.throughput[bs] = measure_throughput(model, shape, bs, device, spec.throughput_seconds)
        except Exception as exc:
            errors.append(f"batch {bs}: {_err(exc)}")
    result.throughput_error = "; ".join(errors) or None

    cpu_model = model.cpu()
    try:
        result.size_fp32_mb = fp32_size_bytes(cpu_model) / 2**20
    except Exception as exc:
        result.quant_error = f"fp32 size: {_err(exc)}"

    qmodel = None
    if spec.quantize:
        try:
            qmodel, layers = quantize_int8(cpu_model)
            result.int8_quantized_layers = layers
            result.size_int8_mb = state_dict_bytes(qmodel) / 2**20
            result.int8_note = (
                f"{layers} nn.Linear layers int8; convolutions stay fp32 (no dynamic int8 conv kernels)"
                if layers else "no nn.Linear layers: dynamic int8 does not apply to convolutions, size unchanged")
            # int8 dynamic kernels are CPU-only; on CUDA this latency is not comparable with the fp32 one.
            int8_times, _ = time_batch1(qmodel, shape, torch.device("cpu"), spec.warmup, spec.iterations)
            result.int8_latency_p50_ms = float(np.percentile(int8_times, 50))
            if device.type != "cpu":
                result.int8_note += "; int8 latency measured on CPU"
        except Exception as exc:
            result.quant_error = _err(exc)
            qmodel = None

    if spec.dataset:
        try:
            if preprocess is None:
                raise InvalidArgument(f"accuracy on a dataset needs an image model, not input {list(shape)}")
            images, labels = load_eval_set(spec.dataset, spec.dataset_limit)
            x = preprocess(images)
            result.accuracy_fp32 = top1(cpu_model, x, labels)
            result.accuracy_samples = len(x)
            if qmodel is not None:
                result.accuracy_int8 = top1(qmodel, x, labels)
                result.accuracy_delta = result.accuracy_int8 - result.accuracy_fp32
        except Exception as exc:
            result.accuracy_error = _err(exc)

    if hasattr(model, "generate") and hasattr(model, "image_token_id"):
        try:
            result.ms_per_token = time_generation(cpu_model.to(device), shape, device)
        except Exception as exc:
            result.generation_error = _err(exc)

    result.duration_s = time.perf_counter() - started
    return result


def _subprocess_env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    if threads:
        # OpenMP reads this once at load; torch.set_num_threads in the child covers torch's own pool.
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def measure_in_subprocess(spec: MeasureSpec, timeout_s: float = 1800.0) -> ModelResult:
    """Run ``shared.benchmark.measure`` for one model in a fresh interpreter and read its result back."""
    with tempfile.TemporaryDirectory(prefix="trainyard-bench-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(spec.model_dump_json())
        cmd = [sys.executable, "-m", "shared.benchmark.measure", str(spec_path), str(out_path)]
        started = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=REPO_ROOT, env=_subprocess_env(spec.threads), capture_output=True,
                                  text=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            return ModelResult(model=spec.model, device=spec.device,
                               error=f"measurement timed out after {timeout_s:.0f} s",
                               duration_s=time.perf_counter() - started)
        if out_path.exists():
            return ModelResult.model_validate_json(out_path.read_text())
        # Killed (e.g. by the OOM killer) or crashed in native code before it could write a result.
        tail = (proc.stderr or "").strip()[-2000:]
        return ModelResult(model=spec.model, device=spec.device,
                           error=f"measurement process exited with code {proc.returncode}: {tail}",
                           duration_s=time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m shared.benchmark.measure SPEC.json RESULT.json", file=sys.stderr)
        return 2
    configure(os.environ.get("TRAINYARD_LOG_LEVEL", "WARNING"))
    spec = MeasureSpec.model_validate_json(Path(argv[0]).read_text())
    try:
        result = measure_model(spec)
    except Exception as exc:
        # Whatever no stage caught still yields a result row instead of a silent crash.
        traceback.print_exc()
        result = ModelResult(model=spec.model, error=_err(exc))
    Path(argv[1]).write_text(result.model_dump_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())

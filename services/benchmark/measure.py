"""All measurements of one model, run inside a fresh subprocess.

``python -m services.benchmark.measure SPEC.json RESULT.json`` reads a ``MeasureSpec``, measures the model
and writes a ``ModelResult``. A fresh process per model is what makes the CPU peak-memory figure the model's
own (nothing from an earlier model is resident) and lets the thread count be set before any kernel runs.

Order matters: memory is measured first, right after the model is built, so the FLOP counter, the latency
loops and the int8 copy cannot raise the high-water mark. Each later stage records its own error and the
others still run, so one failing stage never blanks the whole row.

FLOP convention (``count_flops``): torch's ``FlopCounterMode`` counts conv, mm/addmm/bmm/baddbmm and the
CUDA attention kernels at 2 FLOPs per multiply-accumulate. timm's published GMACs come from fvcore, which
also counts scaled-dot-product attention on CPU and gives normalisation layers a fixed per-element cost.
Two things were missing from torch's registry and made the 7 reference models miss timm's figures by up to
8%: CPU attention (``aten._scaled_dot_product_flash_attention_for_cpu``, not registered at all, so ViT/DeiT
lost their QK^T and AV products) and the norm layers (MobileNetV3 / EfficientNet are BN-heavy: -5.8% / -3.6%
without them). ``EXTRA_FLOP_FORMULAS`` adds both with fvcore's costs, so GMACs = FLOPs / 2 match timm within
1%. Elementwise activations, adds, softmax and means (incl. squeeze-excite pools) are not counted, exactly as
in fvcore; ``FLOPs (G)`` is reported as 2 x GMACs.
"""
from __future__ import annotations

import copy
import importlib
import io
import math
import os
import resource
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from pydantic import BaseModel, Field
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from services.benchmark.hardware import HardwareInfo, fingerprint
from shared.errors import FailedPrecondition, InvalidArgument, NotFound
from shared.logs import configure, get_logger

log = get_logger(__name__)

aten = torch.ops.aten

FLOPS_CONVENTION = (
    "MACs as timm/fvcore count them: 1 per multiply-accumulate in conv, linear, (b)mm and attention "
    "(QK^T and AV); batch norm 2/element (eval, affine), layer/group norm 5/element (affine), adaptive "
    "avg-pool 1/input element, upsampling 1 (nearest) or 4 (bilinear)/output element; activations, adds, "
    "softmax and means not counted. FLOPs = 2 x MACs."
)


class MeasureSpec(BaseModel):
    """What the subprocess measures for one model (built by the runner from a BenchRequest)."""

    model: str
    input_shape: tuple[int, int, int] | None = None
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

    hardware: HardwareInfo | None = None
    mlflow_run_id: str | None = None
    tracking_error: str | None = None
    duration_s: float | None = None


# --------------------------------------------------------------------------------------------- FLOPs


def _numel(shape) -> int:
    return math.prod(shape) if shape is not None else 0


def _bn_flop(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    # native_batch_norm / _native_batch_norm_legit carry `training` as their first bool argument;
    # _native_batch_norm_legit_no_training has none, which is the eval case.
    training = next((a for a in args if isinstance(a, bool)), False)
    affine = weight_shape is not None
    per_element = (5 if affine else 4) if training else (2 if affine else 1)
    return 2 * per_element * _numel(input_shape)


def _layer_norm_flop(input_shape, normalized_shape, weight_shape=None, *args, out_shape=None, **kwargs) -> int:
    return 2 * (5 if weight_shape is not None else 4) * _numel(input_shape)


def _group_norm_flop(input_shape, weight_shape=None, *args, out_shape=None, **kwargs) -> int:
    return 2 * (5 if weight_shape is not None else 4) * _numel(input_shape)


def _adaptive_pool_flop(input_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * _numel(input_shape)


def _upsample_nearest_flop(*args, out_shape=None, **kwargs) -> int:
    return 2 * _numel(out_shape)


def _upsample_linear_flop(*args, out_shape=None, **kwargs) -> int:
    return 2 * 4 * _numel(out_shape)


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _extra_formulas() -> dict[Any, Callable[..., int]]:
    wanted = {
        "_scaled_dot_product_flash_attention_for_cpu": _sdpa_cpu_flop,
        "_scaled_dot_product_fused_attention_overrideable": _sdpa_cpu_flop,
        "native_batch_norm": _bn_flop,
        "_native_batch_norm_legit": _bn_flop,
        "_native_batch_norm_legit_no_training": _bn_flop,
        "cudnn_batch_norm": _bn_flop,
        "native_layer_norm": _layer_norm_flop,
        "native_group_norm": _group_norm_flop,
        "_adaptive_avg_pool2d": _adaptive_pool_flop,
        "_adaptive_avg_pool3d": _adaptive_pool_flop,
        "upsample_nearest2d": _upsample_nearest_flop,
        "upsample_bilinear2d": _upsample_linear_flop,
    }
    # Some ops only exist in some torch builds; register the ones this build has.
    return {getattr(aten, name): fn for name, fn in wanted.items() if hasattr(aten, name)}


EXTRA_FLOP_FORMULAS = _extra_formulas()


def counted_ops() -> list[str]:
    """Every forward aten op that contributes to the count (torch's own registry plus ours)."""
    registry = FlopCounterMode(custom_mapping=EXTRA_FLOP_FORMULAS).flop_registry
    return sorted(str(op) for op in registry if "backward" not in str(op))


def count_flops(model: nn.Module, example: torch.Tensor) -> tuple[int, dict[str, int]]:
    """FLOPs of one forward pass of ``model`` on ``example`` (2 per MAC), total and per aten op."""
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as counter:
        model(example)
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts()["Global"].items() if n}
    return int(counter.get_total_flops()), by_op


# --------------------------------------------------------------------------------------------- memory


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
    Where clear_refs may not be written only (2) runs; ``method`` says which.
    """

    def __init__(self) -> None:
        self.peak = 0
        self.method = ""
        self._hwm = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> "PeakAnonRss":
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


# --------------------------------------------------------------------------------------------- sizes / int8


def fp32_size_bytes(model: nn.Module) -> int:
    """Bytes of the model's safetensors file, as the exporter writes it (shared tensors stored once)."""
    from safetensors.torch import save_model

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        save_model(model, str(path))
        return path.stat().st_size


def _plain_linears(model: nn.Module) -> int:
    """Turn nn.Linear subclasses that compute exactly nn.Linear's forward into nn.Linear, in place.

    quantize_dynamic matches module types exactly, so timm's ``Linear`` (the classifier of MobileNetV3 and
    EfficientNet) would silently stay fp32. MultiheadAttention's out_proj is left alone: MHA reads its
    ``weight`` directly, which a quantized module no longer has.
    """
    from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

    same_forward = {nn.Linear}
    try:
        from timm.layers import Linear as TimmLinear  # overrides forward only for TorchScript

        same_forward.add(TimmLinear)
    except ImportError:
        pass
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            kind = type(child)
            if (isinstance(child, nn.Linear) and kind is not nn.Linear
                    and not isinstance(child, NonDynamicallyQuantizableLinear)
                    and (kind in same_forward or kind.forward is nn.Linear.forward)):
                plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                plain.weight, plain.bias = child.weight, child.bias
                setattr(parent, name, plain)
                swapped += 1
    return swapped


def quantize_int8(model: nn.Module) -> tuple[nn.Module, int]:
    """Dynamic int8 quantization of every linear layer (weights int8, activations quantized per call).

    Convolutions have no dynamic-quantized kernel in torch, so they stay fp32: a conv-only network's
    int8 size is its fp32 size.
    """
    from torch.ao.nn.quantized.dynamic import Linear as DynLinear
    from torch.ao.quantization import quantize_dynamic

    copy_ = copy.deepcopy(model).cpu().eval()
    _plain_linears(copy_)
    with warnings.catch_warnings():
        # torch 2.13 flags torch.ao quantization as deprecated in favour of torchao (not a dependency);
        # silenced so a crash's stderr tail, which the runner reports, shows the crash and not this.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        qmodel = quantize_dynamic(copy_, {nn.Linear}, dtype=torch.qint8)
    layers = sum(isinstance(m, DynLinear) for m in qmodel.modules())
    return qmodel, layers


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


def prepare_inputs(images: torch.Tensor, shape: tuple[int, int, int],
                   normalization: dict[str, list[float]] | None) -> torch.Tensor:
    """uint8 images -> float inputs of ``shape``: channel repeat/average, resize, /255, then normalise."""
    x = images.float() / 255.0
    c, h, w = shape
    if x.shape[1] != c:
        if x.shape[1] == 1:
            x = x.repeat(1, c, 1, 1)
        elif c == 1:
            x = x.mean(dim=1, keepdim=True)
        else:
            raise InvalidArgument(f"dataset has {x.shape[1]} channels, model expects {c}")
    if tuple(x.shape[2:]) != (h, w):
        x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    if normalization:
        mean = torch.tensor(normalization["mean"]).view(1, -1, 1, 1)
        std = torch.tensor(normalization["std"]).view(1, -1, 1, 1)
        x = (x - mean) / std
    return x


def top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            correct += (model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum().item()
    return 100.0 * correct / len(x)


# --------------------------------------------------------------------------------------------- model


def import_builder(spec: MeasureSpec) -> Callable[[], tuple[nn.Module, tuple[int, int, int], dict | None]]:
    """Import everything building ``spec``'s model needs and return the build step.

    Split from the build so the memory baseline is read after these imports: a first import of timm or
    the store client would otherwise be charged to the model.
    """
    name = spec.model
    if name.startswith("store:"):
        from services.train.export import load_exported
        from shared.settings import load_settings
        from shared.storage import open_store

        ref = name[len("store:"):].strip("/")
        ref = ref[len("models/"):] if ref.startswith("models/") else ref
        model_name, _, version = ref.partition("/")
        if version and not version.isdigit():
            raise InvalidArgument(f"{name!r}: version must be a number, got {version!r}")

        def build_exported():
            model, card = load_exported(open_store(load_settings().store_url), model_name,
                                        int(version) if version else None)
            return model, spec.input_shape or tuple(card["input_size"]), card.get("normalization")

        return build_exported
    shape = spec.input_shape or (3, 224, 224)
    kwargs = dict(spec.model_kwargs)
    if spec.num_classes is not None:
        kwargs["num_classes"] = spec.num_classes
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise NotFound(f"model factory {name!r} not importable: {exc}") from exc
        return lambda: (factory(in_chans=shape[0], **kwargs), shape, None)
    from shared.models import create_model

    return lambda: (create_model(name, in_chans=shape[0], **kwargs), shape, None)


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
        model, shape, normalization = build()
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
            images, labels = load_eval_set(spec.dataset, spec.dataset_limit)
            x = prepare_inputs(images, shape, normalization)
            result.accuracy_fp32 = top1(cpu_model, x, labels)
            result.accuracy_samples = len(x)
            if qmodel is not None:
                result.accuracy_int8 = top1(qmodel, x, labels)
                result.accuracy_delta = result.accuracy_int8 - result.accuracy_fp32
        except Exception as exc:
            result.accuracy_error = _err(exc)

    result.duration_s = time.perf_counter() - started
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m services.benchmark.measure SPEC.json RESULT.json", file=sys.stderr)
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

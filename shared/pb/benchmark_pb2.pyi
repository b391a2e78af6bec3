from . import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BenchmarkRequest(_message.Message):
    __slots__ = ("models", "input_shape", "batch_sizes", "num_classes", "warmup", "iterations", "threads", "device", "quantize", "dataset", "experiment", "out")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZES_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    WARMUP_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    QUANTIZE_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    OUT_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedScalarFieldContainer[str]
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    batch_sizes: _containers.RepeatedScalarFieldContainer[int]
    num_classes: int
    warmup: int
    iterations: int
    threads: int
    device: str
    quantize: bool
    dataset: str
    experiment: str
    out: str
    def __init__(self, models: _Optional[_Iterable[str]] = ..., input_shape: _Optional[_Iterable[int]] = ..., batch_sizes: _Optional[_Iterable[int]] = ..., num_classes: _Optional[int] = ..., warmup: _Optional[int] = ..., iterations: _Optional[int] = ..., threads: _Optional[int] = ..., device: _Optional[str] = ..., quantize: _Optional[bool] = ..., dataset: _Optional[str] = ..., experiment: _Optional[str] = ..., out: _Optional[str] = ...) -> None: ...

class Throughput(_message.Message):
    __slots__ = ("batch_size", "samples_per_second")
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    batch_size: int
    samples_per_second: float
    def __init__(self, batch_size: _Optional[int] = ..., samples_per_second: _Optional[float] = ...) -> None: ...

class Hardware(_message.Message):
    __slots__ = ("cpu", "threads", "torch_version", "gpu", "platform")
    CPU_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    TORCH_VERSION_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    cpu: str
    threads: int
    torch_version: str
    gpu: str
    platform: str
    def __init__(self, cpu: _Optional[str] = ..., threads: _Optional[int] = ..., torch_version: _Optional[str] = ..., gpu: _Optional[str] = ..., platform: _Optional[str] = ...) -> None: ...

class ModelBenchmark(_message.Message):
    __slots__ = ("model", "input_shape", "params_total", "params_trainable", "gmacs", "gflops", "flops_error", "counted_ops", "latency_p50_ms", "latency_p90_ms", "latency_p99_ms", "threads", "throughput", "peak_memory_mb", "peak_memory_method", "size_fp32_mb", "size_int8_mb", "int8_latency_p50_ms", "accuracy_fp32", "accuracy_int8", "hardware", "device", "mlflow_run_id", "error", "stage_errors", "notes")
    class StageErrorsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    PARAMS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PARAMS_TRAINABLE_FIELD_NUMBER: _ClassVar[int]
    GMACS_FIELD_NUMBER: _ClassVar[int]
    GFLOPS_FIELD_NUMBER: _ClassVar[int]
    FLOPS_ERROR_FIELD_NUMBER: _ClassVar[int]
    COUNTED_OPS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P50_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P90_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P99_MS_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_METHOD_FIELD_NUMBER: _ClassVar[int]
    SIZE_FP32_MB_FIELD_NUMBER: _ClassVar[int]
    SIZE_INT8_MB_FIELD_NUMBER: _ClassVar[int]
    INT8_LATENCY_P50_MS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FP32_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_INT8_FIELD_NUMBER: _ClassVar[int]
    HARDWARE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MLFLOW_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    STAGE_ERRORS_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    model: str
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    params_total: int
    params_trainable: int
    gmacs: float
    gflops: float
    flops_error: str
    counted_ops: _containers.RepeatedScalarFieldContainer[str]
    latency_p50_ms: float
    latency_p90_ms: float
    latency_p99_ms: float
    threads: int
    throughput: _containers.RepeatedCompositeFieldContainer[Throughput]
    peak_memory_mb: float
    peak_memory_method: str
    size_fp32_mb: float
    size_int8_mb: float
    int8_latency_p50_ms: float
    accuracy_fp32: float
    accuracy_int8: float
    hardware: Hardware
    device: str
    mlflow_run_id: str
    error: str
    stage_errors: _containers.ScalarMap[str, str]
    notes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., input_shape: _Optional[_Iterable[int]] = ..., params_total: _Optional[int] = ..., params_trainable: _Optional[int] = ..., gmacs: _Optional[float] = ..., gflops: _Optional[float] = ..., flops_error: _Optional[str] = ..., counted_ops: _Optional[_Iterable[str]] = ..., latency_p50_ms: _Optional[float] = ..., latency_p90_ms: _Optional[float] = ..., latency_p99_ms: _Optional[float] = ..., threads: _Optional[int] = ..., throughput: _Optional[_Iterable[_Union[Throughput, _Mapping]]] = ..., peak_memory_mb: _Optional[float] = ..., peak_memory_method: _Optional[str] = ..., size_fp32_mb: _Optional[float] = ..., size_int8_mb: _Optional[float] = ..., int8_latency_p50_ms: _Optional[float] = ..., accuracy_fp32: _Optional[float] = ..., accuracy_int8: _Optional[float] = ..., hardware: _Optional[_Union[Hardware, _Mapping]] = ..., device: _Optional[str] = ..., mlflow_run_id: _Optional[str] = ..., error: _Optional[str] = ..., stage_errors: _Optional[_Mapping[str, str]] = ..., notes: _Optional[_Iterable[str]] = ...) -> None: ...

class BenchmarkEvent(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: _common_pb2.Progress
    result: ModelBenchmark
    def __init__(self, progress: _Optional[_Union[_common_pb2.Progress, _Mapping]] = ..., result: _Optional[_Union[ModelBenchmark, _Mapping]] = ...) -> None: ...

"""gRPC servicer of the benchmark service: thin, it delegates to services.benchmark.runner."""
from __future__ import annotations

import grpc

from services.benchmark.runner import make_request, run_benchmarks
from shared.benchmark.measure import ModelResult
from shared.errors import InvalidArgument
from shared.grpc_server import serve, service_arg_parser
from shared.pb import benchmark_pb2, benchmark_pb2_grpc, common_pb2
from shared.streaming import JobProgress, StreamedJob, job_status

_STAGE_ERRORS = {"latency": "latency_error", "throughput": "throughput_error", "memory": "memory_error",
                 "quantization": "quant_error", "accuracy": "accuracy_error", "tracking": "tracking_error"}


def to_proto(r: ModelResult) -> benchmark_pb2.ModelBenchmark:
    hw = r.hardware
    return benchmark_pb2.ModelBenchmark(
        model=r.model, input_shape=r.input_shape, params_total=r.params_total or 0,
        params_trainable=r.params_trainable or 0, gmacs=r.gmacs or 0.0, gflops=r.gflops or 0.0,
        flops_error=r.flops_error or "", counted_ops=r.counted_ops, latency_p50_ms=r.latency_p50_ms or 0.0,
        latency_p90_ms=r.latency_p90_ms or 0.0, latency_p99_ms=r.latency_p99_ms or 0.0, threads=r.threads or 0,
        throughput=[benchmark_pb2.Throughput(batch_size=int(b), samples_per_second=v)
                    for b, v in sorted(r.throughput.items())],
        peak_memory_mb=r.peak_memory_mb or 0.0, peak_memory_method=r.peak_memory_method,
        size_fp32_mb=r.size_fp32_mb or 0.0, size_int8_mb=r.size_int8_mb or 0.0,
        int8_latency_p50_ms=r.int8_latency_p50_ms or 0.0, accuracy_fp32=r.accuracy_fp32 or 0.0,
        accuracy_int8=r.accuracy_int8 or 0.0,
        hardware=benchmark_pb2.Hardware(cpu=hw.cpu, threads=hw.torch_threads, torch_version=hw.torch_version,
                                        gpu=hw.gpu, platform=hw.platform) if hw else None,
        device=r.device, mlflow_run_id=r.mlflow_run_id or "", error=r.error or "",
        stage_errors={stage: getattr(r, attr) for stage, attr in _STAGE_ERRORS.items() if getattr(r, attr)},
        notes=[n for n in (r.latency_note, r.int8_note) if n],
    )


def request_from_proto(request: benchmark_pb2.BenchmarkRequest):
    if not request.models:
        raise InvalidArgument("BenchmarkRequest.models is empty")
    if request.input_shape and len(request.input_shape) != 3:
        raise InvalidArgument(f"input_shape must be C, H, W; got {list(request.input_shape)}")
    fields = {"models": list(request.models), "device": request.device or "auto", "quantize": request.quantize,
              "experiment": request.experiment or "benchmarks"}
    optional = {"input_shape": tuple(request.input_shape) or None, "batch_sizes": list(request.batch_sizes) or None,
                "num_classes": request.num_classes or None, "warmup": request.warmup or None,
                "iterations": request.iterations or None, "threads": request.threads or None,
                "dataset": request.dataset or None, "out": request.out or None}
    fields.update({k: v for k, v in optional.items() if v is not None})
    return make_request(**fields)


class BenchmarkServiceServicer(benchmark_pb2_grpc.BenchmarkServiceServicer):
    def Benchmark(self, request, context):
        bench_request = request_from_proto(request)
        total = len(bench_request.models)

        def work(report):
            def progress(done, _total, model, result):
                verb = "measured" if result is not None else "measuring"
                report(JobProgress(done, total, f"{verb} {model}", result))

            return run_benchmarks(bench_request, progress=progress)

        job = StreamedJob(work, stage="measure", output=bench_request.out or None, is_active=context.is_active,
                         deadline_s=context.time_remaining())
        yield benchmark_pb2.BenchmarkEvent(progress=job.progress(total=total))
        for event in job:
            if isinstance(event, JobProgress):
                if event.item is not None:
                    yield benchmark_pb2.BenchmarkEvent(result=to_proto(event.item))
                yield benchmark_pb2.BenchmarkEvent(progress=job.progress(done=event.done, total=total,
                                                                         message=event.message))
            else:
                failed = [r for r in event.result if r.error]
                yield benchmark_pb2.BenchmarkEvent(progress=job.progress(
                    "succeeded", "report", done=total, total=total, failed=len(failed),
                    outputs={"table": bench_request.out} if bench_request.out else {},
                    failures=[common_pb2.ItemFailure(item=r.model, reason=r.error) for r in failed]))

    def GetJob(self, request, context):
        return job_status(request.job_id, request.output)


def register(server: grpc.Server) -> list[str]:
    benchmark_pb2_grpc.add_BenchmarkServiceServicer_to_server(BenchmarkServiceServicer(), server)
    return [benchmark_pb2.DESCRIPTOR.services_by_name["BenchmarkService"].full_name]


def main(argv: list[str] | None = None) -> None:
    serve("benchmark", register, service_arg_parser("benchmark").parse_args(argv))

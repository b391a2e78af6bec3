"""BenchmarkService over real gRPC: results stream per model, failures are reported, never blank."""
import grpc
import pytest

from services.benchmark.server import BenchmarkServiceServicer
from shared.grpc_client import channel
from shared.grpc_server import start
from shared.pb import benchmark_pb2, benchmark_pb2_grpc


@pytest.fixture
def stub(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINYARD_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")

    def register(server):
        benchmark_pb2_grpc.add_BenchmarkServiceServicer_to_server(BenchmarkServiceServicer(), server)
        return ["trainyard.v1.BenchmarkService"]

    host = start("benchmark", register, port=0)
    yield benchmark_pb2_grpc.BenchmarkServiceStub(channel(f"127.0.0.1:{host.port}"))
    host.stop(1)


def test_benchmark_streams_true_numbers_and_reports_unknown_models(stub, tmp_path):
    out = tmp_path / "results.md"
    events = list(stub.Benchmark(benchmark_pb2.BenchmarkRequest(
        models=["mnist_ultralight", "no_such_model"], input_shape=[1, 28, 28], batch_sizes=[1, 16],
        warmup=2, iterations=10, out=str(out)), timeout=600))
    results = {e.result.model: e.result for e in events if e.HasField("result")}
    final = events[-1].progress
    assert final.state == "succeeded" and final.done == 2 and final.failed == 1
    ok = results["mnist_ultralight"]
    assert ok.params_total == 6008 and not ok.error
    assert ok.gmacs > 0 and not ok.flops_error and ok.counted_ops
    assert 0 < ok.latency_p50_ms <= ok.latency_p90_ms <= ok.latency_p99_ms
    assert {t.batch_size for t in ok.throughput} == {1, 16} and all(t.samples_per_second > 0 for t in ok.throughput)
    assert ok.peak_memory_mb > 0 and ok.peak_memory_method
    assert ok.hardware.torch_version and ok.threads >= 1
    bad = results["no_such_model"]
    assert bad.error and "no_such_model" in bad.error
    assert [f.item for f in final.failures] == ["no_such_model"]
    table = out.read_text()
    assert "| Model | Params (M) | FLOPs (G) | Latency (ms) | Throughput (img/s) | Peak Memory (MB) |" in table
    assert "mnist_ultralight" in table and "no_such_model" in table


def test_bad_requests_are_invalid_argument(stub):
    for request in (benchmark_pb2.BenchmarkRequest(), benchmark_pb2.BenchmarkRequest(models=["x"], input_shape=[3, 2])):
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Benchmark(request, timeout=60))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

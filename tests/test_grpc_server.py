"""The shared bootstrap, exercised on a real server with a small test servicer."""
import gc
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY

from shared import errors
from shared.grpc_client import channel, health_status, wait_serving
from shared.grpc_server import REQUEST_ID_HEADER, start
from shared.pb import train_pb2, train_pb2_grpc
from tests.harness.tls import make_tls_dir


class _Servicer(train_pb2_grpc.TrainServiceServicer):
    """GetRun raises the domain error named by the run id; WatchRun streams two events then fails, or streams
    until the client goes away for run id "endless"."""

    def GetRun(self, request, context):
        if request.run_id == "missing":
            raise errors.NotFound("run 'missing' does not exist")
        if request.run_id == "bad":
            raise errors.InvalidArgument("run id 'bad' is malformed")
        if request.run_id == "boom":
            raise RuntimeError("kaboom")
        if request.run_id == "slow":
            time.sleep(1.0)
        return train_pb2.Run(run_id=request.run_id)

    def WatchRun(self, request, context):
        if request.run_id == "endless":
            epoch = 0
            while True:
                epoch += 1
                yield train_pb2.RunEvent(epoch=train_pb2.EpochMetrics(epoch=epoch))
                time.sleep(0.01)
        yield train_pb2.RunEvent(epoch=train_pb2.EpochMetrics(epoch=1))
        yield train_pb2.RunEvent(epoch=train_pb2.EpochMetrics(epoch=2))
        raise errors.FailedPrecondition("run was cancelled")


def _register(server):
    train_pb2_grpc.add_TrainServiceServicer_to_server(_Servicer(), server)
    return [train_pb2.DESCRIPTOR.services_by_name["TrainService"].full_name]


@pytest.fixture
def host():
    gate = threading.Event()
    svc = start("test", _register, port=0, metrics_port=None, max_message_bytes=1024 * 1024, warmup=gate.wait)
    svc.gate = gate
    yield svc
    svc.stop(grace=1)


def _stub(host):
    return train_pb2_grpc.TrainServiceStub(channel(f"127.0.0.1:{host.port}"))


def test_health_is_not_serving_until_warmup_finishes_then_serving(host):
    addr = f"127.0.0.1:{host.port}"
    assert health_status(addr) == "NOT_SERVING"
    assert health_status(addr, "trainyard.v1.TrainService") == "NOT_SERVING"
    host.gate.set()
    deadline = time.monotonic() + 5
    while health_status(addr) != "SERVING" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert health_status(addr) == "SERVING"
    assert health_status(addr, "trainyard.v1.TrainService") == "SERVING"


@pytest.mark.parametrize(
    "run_id, code, text",
    [("missing", grpc.StatusCode.NOT_FOUND, "does not exist"),
     ("bad", grpc.StatusCode.INVALID_ARGUMENT, "malformed"),
     ("boom", grpc.StatusCode.INTERNAL, "kaboom")],
)
def test_domain_errors_map_to_status_codes(host, run_id, code, text):
    with pytest.raises(grpc.RpcError) as info:
        _stub(host).GetRun(train_pb2.GetRunRequest(run_id=run_id), timeout=5)
    assert info.value.code() == code
    assert text in info.value.details()
    # and the server keeps serving
    assert _stub(host).GetRun(train_pb2.GetRunRequest(run_id="ok"), timeout=5).run_id == "ok"


def test_streaming_error_after_items(host):
    call = _stub(host).WatchRun(train_pb2.WatchRunRequest(run_id="x"), timeout=5)
    got = []
    with pytest.raises(grpc.RpcError) as info:
        for event in call:
            got.append(event.epoch.epoch)
    assert got == [1, 2]
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_request_id_is_echoed(host):
    _, call = _stub(host).GetRun.with_call(
        train_pb2.GetRunRequest(run_id="ok"), metadata=((REQUEST_ID_HEADER, "abc123"),), timeout=5
    )
    assert dict(call.initial_metadata())[REQUEST_ID_HEADER] == "abc123"


def test_message_over_the_limit_is_resource_exhausted(host):
    with pytest.raises(grpc.RpcError) as info:
        _stub(host).GetRun(train_pb2.GetRunRequest(run_id="x" * (2 * 1024 * 1024)), timeout=5)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_unimplemented_rpc_says_so(host):
    with pytest.raises(grpc.RpcError) as info:
        _stub(host).ListRuns(train_pb2.ListRunsRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_reflection_lists_the_services(host):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel(f"127.0.0.1:{host.port}"))
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"trainyard.v1.TrainService", "grpc.health.v1.Health"} <= names


def test_drain_reports_not_serving_and_lets_inflight_calls_finish(host):
    host.gate.set()
    addr = f"127.0.0.1:{host.port}"
    ch = channel(addr)
    stub = train_pb2_grpc.TrainServiceStub(ch)
    health = health_pb2_grpc.HealthStub(ch)
    time.sleep(0.2)
    future = stub.GetRun.future(train_pb2.GetRunRequest(run_id="slow"), timeout=5)
    time.sleep(0.2)
    stopper = threading.Thread(target=host.stop, kwargs={"grace": 5})
    stopper.start()
    time.sleep(0.1)
    assert future.result().run_id == "slow"
    stopper.join()
    with pytest.raises(grpc.RpcError):
        health.Check(health_pb2.HealthCheckRequest(), timeout=1)


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_a_stream_the_client_cancels_counts_as_cancelled_not_as_an_error(host):
    labels = {"grpc_type": "server_stream", "grpc_service": "trainyard.v1.TrainService", "grpc_method": "WatchRun"}

    def handled(code: str) -> float:
        return REGISTRY.get_sample_value("grpc_server_handled_total", {**labels, "grpc_code": code}) or 0

    before = {code: handled(code) for code in ("Canceled", "Internal", "Unknown")}
    stream = _stub(host).WatchRun(train_pb2.WatchRunRequest(run_id="endless"), timeout=30)
    assert [next(stream).epoch.epoch for _ in range(3)] == [1, 2, 3]
    stream.cancel()
    deadline = time.monotonic() + 10
    while handled("Canceled") == before["Canceled"]:
        assert time.monotonic() < deadline, "the cancelled stream was never counted"
        gc.collect()  # the server closes an abandoned generator when it is collected
        time.sleep(0.05)
    for code in ("Internal", "Unknown"):
        assert handled(code) == before[code]
    assert _stub(host).GetRun(train_pb2.GetRunRequest(run_id="ok"), timeout=5).run_id == "ok"


def test_tls_port_refuses_plaintext_and_health_port_serves_probes(tmp_path, monkeypatch):
    tls = make_tls_dir(tmp_path / "tls")
    svc = start("tls-test", _register, tls_dir=tls, health_port=0, warmup=lambda: None)
    addr = f"127.0.0.1:{svc.port}"
    try:
        monkeypatch.setenv("TRAINYARD_TLS_DIR", str(tls))  # what the clients read
        wait_serving(addr, deadline_s=10)
        assert _stub(svc).GetRun(train_pb2.GetRunRequest(run_id="ok"), timeout=5).run_id == "ok"
        with grpc.insecure_channel(addr) as plain, pytest.raises(grpc.RpcError) as info:
            train_pb2_grpc.TrainServiceStub(plain).GetRun(train_pb2.GetRunRequest(run_id="ok"), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # Kubelet's gRPC probes speak plaintext: the health port answers them, and serves nothing else.
        with grpc.insecure_channel(f"127.0.0.1:{svc.health_port}") as plain:
            answer = health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as info:
                train_pb2_grpc.TrainServiceStub(plain).GetRun(train_pb2.GetRunRequest(run_id="ok"), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        svc.stop(grace=1)
    with grpc.insecure_channel(f"127.0.0.1:{svc.health_port}") as plain, pytest.raises(grpc.RpcError):
        health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=1)


def test_tls_without_its_key_fails_at_start_and_says_which_file(tmp_path):
    tls = make_tls_dir(tmp_path / "tls")
    (tls / "tls.key").unlink()
    with pytest.raises(FileNotFoundError, match=r"tls\.key is missing"):
        start("tls-test", _register, tls_dir=tls)

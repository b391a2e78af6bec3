"""Overload and error text on a real server: calls beyond the admission limit are refused at once with
RESOURCE_EXHAUSTED and counted (none time out in a queue), health checks still answer, and no status
message carries an object repr or a memory address."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from prometheus_client import REGISTRY

from shared import errors
from shared.grpc_client import channel, health_status
from shared.grpc_server import start
from shared.pb import train_pb2, train_pb2_grpc

SERVICE = "overload-test"


class _Servicer(train_pb2_grpc.TrainServiceServicer):
    def GetRun(self, request, context):
        if request.run_id == "repr":
            raise RuntimeError(f"cannot encode {object()!r}")
        if request.run_id == "typed-repr":
            raise errors.InvalidArgument(f"bad value {object()!r} at 0x7f3a2b4c5d60")
        time.sleep(0.5)
        return train_pb2.Run(run_id=request.run_id)


def _count(code: str) -> float:
    return REGISTRY.get_sample_value("grpc_server_handled_total", {
        "grpc_type": "unary", "grpc_service": "trainyard.v1.TrainService", "grpc_method": "GetRun", "grpc_code": code,
    }) or 0.0


def _started() -> float:
    return REGISTRY.get_sample_value("grpc_server_started_total", {
        "grpc_type": "unary", "grpc_service": "trainyard.v1.TrainService", "grpc_method": "GetRun"}) or 0.0


def _serve(max_workers: int):
    def register(server):
        train_pb2_grpc.add_TrainServiceServicer_to_server(_Servicer(), server)
        return [train_pb2.DESCRIPTOR.services_by_name["TrainService"].full_name]

    return start(SERVICE, register, port=0, max_workers=max_workers)


def test_overload_is_refused_at_once_and_counted_while_health_answers():
    host = _serve(max_workers=4)
    address = f"127.0.0.1:{host.port}"
    before = {code: _count(code) for code in ("OK", "ResourceExhausted")}
    started_before = _started()
    calls = 300
    try:
        with channel(address) as ch, ThreadPoolExecutor(64) as pool:
            stub = train_pb2_grpc.TrainServiceStub(ch)

            def call(i: int) -> grpc.StatusCode:
                try:
                    stub.GetRun(train_pb2.GetRunRequest(run_id=f"r{i}"), timeout=5)
                    return grpc.StatusCode.OK
                except grpc.RpcError as exc:
                    return exc.code()

            futures = [pool.submit(call, i) for i in range(calls)]
            time.sleep(0.2)
            assert health_status(address) == "SERVING"  # probes are never refused for load
            codes = [f.result() for f in futures]
    finally:
        host.stop(grace=2)
    ok, refused = codes.count(grpc.StatusCode.OK), codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
    # Only the two answers overload may give: nothing waited in a queue until its deadline cancelled it.
    assert ok + refused == calls, {c.name: codes.count(c) for c in set(codes)}
    assert ok >= 4 and refused > 0
    # Every call is in the metrics with the code its client saw.
    assert _count("OK") - before["OK"] == ok
    assert _count("ResourceExhausted") - before["ResourceExhausted"] == refused
    assert _started() - started_before == calls  # refused calls started too: nothing left in flight


def test_status_messages_carry_no_reprs_or_addresses():
    host = _serve(max_workers=4)
    try:
        with channel(f"127.0.0.1:{host.port}") as ch:
            stub = train_pb2_grpc.TrainServiceStub(ch)
            for run_id, code in (("repr", grpc.StatusCode.INTERNAL), ("typed-repr", grpc.StatusCode.INVALID_ARGUMENT)):
                try:
                    stub.GetRun(train_pb2.GetRunRequest(run_id=run_id), timeout=5)
                    raise AssertionError("expected an error")
                except grpc.RpcError as exc:
                    assert exc.code() == code
                    assert "0x" not in exc.details() and "object at" not in exc.details(), exc.details()
                    assert "cannot encode <object>" in exc.details() or "bad value <object>" in exc.details()
    finally:
        host.stop(grace=2)

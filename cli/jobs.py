"""``trainyard job``: the state of a render, conversion or benchmark job after its stream ended."""
from __future__ import annotations

import argparse

from cli.output import add_output_options, emit, proto_dict
from shared.grpc_server import SERVICE_PORTS

# The services with long jobs, and their stubs (imported when used).
_STUBS = {"render": "render_pb2_grpc.RenderServiceStub", "convert": "convert_pb2_grpc.ConvertServiceStub",
          "benchmark": "benchmark_pb2_grpc.BenchmarkServiceStub"}


def _status(args) -> int:
    import importlib

    from shared.grpc_client import channel
    from shared.pb import common_pb2

    module, stub_name = _STUBS[args.service].split(".")
    stub_class = getattr(importlib.import_module(f"shared.pb.{module}"), stub_name)
    server = args.server or f"127.0.0.1:{SERVICE_PORTS[args.service][0]}"
    with channel(server) as ch:
        job = stub_class(ch).GetJob(common_pb2.GetJobRequest(job_id=args.job_id or "", output=args.output or ""),
                                    timeout=30)
    emit(args, {"service": args.service, **proto_dict(job)},
         f"job {job.job_id} ({args.service} {job.stage}): {job.state}, {job.done}/{job.total} "
         f"after {job.elapsed_seconds:.1f}s" + (f"\n  {job.message}" if job.message else ""))
    return 0 if job.state in ("succeeded", "running") else 1


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("job", help="the state of a render / convert / benchmark job, also after its client "
                                   "went away (the error when it failed)")
    p.add_argument("service", choices=list(_STUBS))
    p.add_argument("job_id", nargs="?", help="the job id its progress messages carried")
    p.add_argument("--output", help="instead of an id: the newest job that wrote this location")
    p.add_argument("--server", help="the service's address (default: its local port)")
    add_output_options(p)
    p.set_defaults(func=_status)

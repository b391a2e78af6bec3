"""gRPC servicer of the render service: thin, it delegates to services.render.datasets."""
from __future__ import annotations

import json

import grpc

from services.render.datasets import RenderSpec, render
from services.render.jobs import DEFAULT_MAX_FAILURES, KINDS, kind_of_field
from shared.errors import InvalidArgument
from shared.grpc_server import serve, service_arg_parser
from shared.pb import common_pb2, render_pb2, render_pb2_grpc
from shared.storage import Manifest, open_location
from shared.storage.manifest import reading_meta
from shared.streaming import JobProgress, StreamedJob, job_status


def spec_from_request(request: render_pb2.RenderRequest, default_workers: int) -> RenderSpec:
    which = request.WhichOneof("kind")
    if which is None:
        raise InvalidArgument(f"RenderRequest needs a kind: {', '.join(k.field for k in KINDS.values())}")
    if not request.out:
        raise InvalidArgument("RenderRequest.out is empty: give a local path or s3://bucket/prefix")
    kind = kind_of_field(which)
    message = getattr(request, which)
    return RenderSpec(kind=kind.name, out=request.out, count=request.count, seed=request.seed,
                      workers=request.workers or default_workers, resume=request.resume,
                      max_failures=request.max_failures or DEFAULT_MAX_FAILURES,
                      options={name: getattr(message, name) for name in kind.options})


def _published(job: StreamedJob, location: str, manifest: Manifest) -> common_pb2.Progress:
    meta = manifest.meta or {}
    failures = meta.get("failures", []) if isinstance(meta.get("failures"), list) else []
    return job.progress(
        "succeeded", "publish", done=meta.get("total", 0), total=meta.get("total", 0), failed=len(failures),
        outputs={"dataset": location},
        failures=[common_pb2.ItemFailure(item=str(f.get("model_id", "")), reason=str(f.get("reason", "")))
                  for f in failures])


class RenderServiceServicer(render_pb2_grpc.RenderServiceServicer):
    def __init__(self, default_workers: int = 1):
        self.default_workers = default_workers

    def Render(self, request, context):
        spec = spec_from_request(request, self.default_workers)
        job = StreamedJob(lambda report: render(spec, lambda done, total, _info: report(JobProgress(done, total))),
                          stage="render", output=spec.out, is_active=context.is_active,
                          deadline_s=context.time_remaining())
        yield job.progress()
        for event in job:
            if isinstance(event, JobProgress):
                yield job.progress(done=event.done, total=event.total)
            else:
                yield _published(job, *event.result)

    def GetJob(self, request, context):
        return job_status(request.job_id, request.output)

    def DescribeDataset(self, request, context):
        store, prefix = open_location(request.location)
        manifest = store.read_manifest(prefix)
        meta = manifest.meta or {}
        with reading_meta(request.location):
            return render_pb2.DatasetInfo(
                location=request.location, kind=str(meta.get("kind", "")), items=int(meta.get("total", 0) or 0),
                files=len(manifest.files), bytes=manifest.total_size,
                generator_version=str(meta.get("generator_version", "")),
                seed=int(meta.get("seed", 0) or 0), meta_json=json.dumps(meta, default=str))


def main(argv: list[str] | None = None) -> None:
    parser = service_arg_parser("render")
    parser.add_argument("--workers", type=int, default=1, help="render processes when a request names none")
    args = parser.parse_args(argv)

    def register(server: grpc.Server) -> list[str]:
        render_pb2_grpc.add_RenderServiceServicer_to_server(RenderServiceServicer(args.workers), server)
        return [render_pb2.DESCRIPTOR.services_by_name["RenderService"].full_name]

    serve("render", register, args)

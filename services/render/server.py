"""gRPC servicer of the render service: thin, it delegates to services.render.datasets."""
from __future__ import annotations

import json
import time
import uuid

import grpc

from services.render.datasets import RenderSpec, render
from shared.errors import InvalidArgument
from shared.grpc_server import serve, service_arg_parser
from shared.pb import common_pb2, render_pb2, render_pb2_grpc
from shared.storage import open_location
from shared.streaming import stream_progress

_KIND_OF_FIELD = {"cad": "cad", "cad_synth": "cad-synth", "trajectories": "trajectories", "logos": "logos",
                  "digits": "digits"}


def spec_from_request(request: render_pb2.RenderRequest, default_workers: int) -> RenderSpec:
    which = request.WhichOneof("kind")
    if which is None:
        raise InvalidArgument("RenderRequest needs a kind: cad, cad_synth, trajectories, logos or digits")
    if not request.out:
        raise InvalidArgument("RenderRequest.out is empty: give a local path or s3://bucket/prefix")
    options = {}
    if which == "cad":
        options = {"input": request.cad.input, "image_size": request.cad.image_size}
    elif which == "trajectories":
        options = {"shard_size": request.trajectories.shard_size}
    elif which == "logos":
        options = {"image_size": request.logos.image_size, "val_per_class": request.logos.val_per_class}
    elif which == "digits":
        options = {"test_count": request.digits.test_count, "gzip": request.digits.gzip}
    return RenderSpec(kind=_KIND_OF_FIELD[which], out=request.out, count=request.count, seed=request.seed,
                      workers=request.workers or default_workers, resume=request.resume, options=options)


class RenderServiceServicer(render_pb2_grpc.RenderServiceServicer):
    def __init__(self, default_workers: int = 1):
        self.default_workers = default_workers

    def Render(self, request, context):
        spec = spec_from_request(request, self.default_workers)
        job_id = uuid.uuid4().hex[:12]
        start = time.monotonic()
        events = stream_progress(lambda report: render(spec, report), is_active=context.is_active,
                                 output=spec.out, job_id=job_id)
        yield common_pb2.Progress(job_id=job_id, state="running", stage="render")
        for kind, item in events:
            if kind == "progress":
                done, total, _info = item
                yield common_pb2.Progress(job_id=job_id, state="running", stage="render", done=done, total=total,
                                          elapsed_seconds=time.monotonic() - start)
            else:
                location, manifest = item
                meta = manifest.meta or {}
                failures = meta.get("failures", []) if isinstance(meta.get("failures"), list) else []
                yield common_pb2.Progress(
                    job_id=job_id, state="succeeded", stage="publish", done=meta.get("total", 0),
                    total=meta.get("total", 0), failed=len(failures), elapsed_seconds=time.monotonic() - start,
                    outputs={"dataset": location},
                    failures=[common_pb2.ItemFailure(item=str(f.get("model_id", "")), reason=str(f.get("reason", "")))
                              for f in failures])

    def DescribeDataset(self, request, context):
        store, prefix = open_location(request.location)
        manifest = store.read_manifest(prefix)
        meta = manifest.meta or {}
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

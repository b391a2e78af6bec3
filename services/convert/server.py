"""gRPC servicer of the convert service: thin, it delegates to tinyllava.py, validate.py and indexes.py."""
from __future__ import annotations

import json
import time
import uuid

import grpc

from services.convert.indexes import (image_folder_from_store, publish_index, trajectory_from_store)
from services.convert.tinyllava import convert_tinyllava
from services.convert.validate import validate_tinyllava
from shared.errors import InvalidArgument
from shared.grpc_server import serve, service_arg_parser
from shared.pb import common_pb2, convert_pb2, convert_pb2_grpc
from shared.storage import open_location
from shared.streaming import stream_progress


def index_dataset(kind: str, path: str, out: str = "") -> tuple[str, dict]:
    """Index a published dataset and publish the index at ``out`` (default ``<path>-index``)."""
    store, prefix = open_location(path)
    index = image_folder_from_store(store, prefix) if kind == "image-folder" else trajectory_from_store(store, prefix)
    out = out or f"{path.rstrip('/')}-index"
    out_store, out_prefix = open_location(out)
    publish_index(out_store, out_prefix, index)
    return out, index


class ConvertServiceServicer(convert_pb2_grpc.ConvertServiceServicer):
    def ToTinyLlava(self, request, context):
        if not (request.cad_json and request.images and request.out):
            raise InvalidArgument("ToTinyLlava needs cad_json, images and out")
        job_id = uuid.uuid4().hex[:12]
        start = time.monotonic()
        work = lambda _report: convert_tinyllava(  # noqa: E731 - one call, its progress is start and end
            request.cad_json, request.images, request.out, split_file=request.split_file or None,
            seed=request.seed, val_fraction=request.val_fraction or 0.1)
        events = stream_progress(work, is_active=context.is_active, output=request.out, job_id=job_id)
        yield common_pb2.Progress(job_id=job_id, state="running", stage="convert")
        for kind, stats in events:
            if kind == "done":
                skipped = sum(stats.skipped.values())
                yield common_pb2.Progress(
                    job_id=job_id, state="succeeded", stage="publish", done=stats.records, total=stats.records,
                    failed=skipped, elapsed_seconds=time.monotonic() - start, outputs={"dataset": stats.out},
                    message=json.dumps(stats.as_dict()))

    def Validate(self, request, context):
        size = (request.image_size, request.image_size) if request.image_size else None
        report = validate_tinyllava(request.path, image_size=size)
        return convert_pb2.ValidationReport(
            ok=report.ok, records=int(report.counts.get("records", 0) or 0),
            images=int(report.counts.get("images", 0) or 0), problems=report.problems, text=str(report))

    def IndexImageFolder(self, request, context):
        location, index = index_dataset("image-folder", request.path, request.out)
        return convert_pb2.IndexResponse(index_location=location, index_json=json.dumps(index))

    def IndexTrajectories(self, request, context):
        location, index = index_dataset("trajectories", request.path, request.out)
        return convert_pb2.IndexResponse(index_location=location, index_json=json.dumps(index))


def register(server: grpc.Server) -> list[str]:
    convert_pb2_grpc.add_ConvertServiceServicer_to_server(ConvertServiceServicer(), server)
    return [convert_pb2.DESCRIPTOR.services_by_name["ConvertService"].full_name]


def main(argv: list[str] | None = None) -> None:
    serve("convert", register, service_arg_parser("convert").parse_args(argv))

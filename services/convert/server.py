"""gRPC servicer of the convert service: thin, it delegates to tinyllava.py, validate.py and indexes.py."""
from __future__ import annotations

import json

import grpc

from services.convert.indexes import index_dataset
from services.convert.tinyllava import convert_tinyllava
from services.convert.validate import validate_tinyllava
from shared.errors import InvalidArgument
from shared.grpc_server import serve, service_arg_parser
from shared.pb import common_pb2, convert_pb2, convert_pb2_grpc
from shared.streaming import JobDone, StreamedJob, job_status


class ConvertServiceServicer(convert_pb2_grpc.ConvertServiceServicer):
    def ToTinyLlava(self, request, context):
        if not (request.cad_json and request.images and request.out):
            raise InvalidArgument("ToTinyLlava needs cad_json, images and out")
        job = StreamedJob(lambda _report: convert_tinyllava(  # one call: its progress is its start and end
            request.cad_json, request.images, request.out, split_file=request.split_file or None,
            seed=request.seed, val_fraction=request.val_fraction or 0.1),
            stage="convert", output=request.out, is_active=context.is_active, deadline_s=context.time_remaining())
        yield job.progress()
        for event in job:
            if isinstance(event, JobDone):
                stats = event.result
                yield job.progress("succeeded", "publish", done=stats.records, total=stats.records,
                                   failed=sum(stats.skipped.values()), outputs={"dataset": stats.out},
                                   failures=[common_pb2.ItemFailure(item=f["model_id"], reason=f["reason"])
                                             for f in stats.failures],
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

    def GetJob(self, request, context):
        return job_status(request.job_id, request.output)


def register(server: grpc.Server) -> list[str]:
    convert_pb2_grpc.add_ConvertServiceServicer_to_server(ConvertServiceServicer(), server)
    return [convert_pb2.DESCRIPTOR.services_by_name["ConvertService"].full_name]


def main(argv: list[str] | None = None) -> None:
    serve("convert", register, service_arg_parser("convert").parse_args(argv))

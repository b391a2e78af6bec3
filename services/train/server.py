"""gRPC servicer of the train service: thin, it delegates to the run registry (runs.py) and its backends."""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace

import grpc

from services.train.k8s_backend import SETTINGS_ENV, JobSettings, KubernetesBackend, settings_overrides
from services.train.local_backend import LocalBackend
from services.train.runs import RunManager, RunView, UnavailableBackend
from services.train.studies.manager import StudyManager, StudyRecord
from shared.errors import FailedPrecondition
from shared.grpc_server import serve, service_arg_parser
from shared.logs import get_logger
from shared.pb import train_pb2, train_pb2_grpc

log = get_logger(__name__)


def to_proto(view: RunView) -> train_pb2.Run:
    r = view.record
    try:
        return train_pb2.Run(
            run_id=r.run_id, state=train_pb2.RunState.Value(f"RUN_STATE_{view.state}"), backend=r.backend,
            experiment=r.experiment, model=r.model, epoch=view.epoch, epochs=r.epochs, metrics=view.metrics,
            mlflow_run_id=view.mlflow_run_id, message=view.message, created_unix=r.created,
            started_unix=view.started, finished_unix=view.finished, config_yaml=r.config_yaml, replicas=r.replicas,
            model_uri=view.model_uri, forked_from=r.forked_from, selection_split=r.selection_split,
        )
    except (ValueError, TypeError) as exc:
        # A record the message cannot carry (written before its fields were bounded, or edited by hand) is
        # answered as such: raised, it would turn every ListRuns into INTERNAL for everyone.
        log.warning("run cannot be encoded", extra={"run_id": str(r.run_id), "error": str(exc)})
        return train_pb2.Run(run_id=str(r.run_id), state=train_pb2.RUN_STATE_UNSPECIFIED,
                             message=f"this run's record cannot be reported: {exc}")


def study_to_proto(record: StudyRecord, metrics: dict[str, dict[str, float]] | None = None) -> train_pb2.Study:
    trials = []
    for t in record.trials:
        outcome = record.outcome(t.trial_id)
        trials.append(train_pb2.Trial(trial_id=t.trial_id, run_id=t.run_id, state=outcome.state,
                                      overrides={k: json.dumps(v) for k, v in t.overrides.items()},
                                      message=outcome.reason, metrics=(metrics or {}).get(t.trial_id, {})))
    return train_pb2.Study(
        study_id=record.study_id, name=record.spec.name, state=record.state, message=record.message,
        backend=record.backend, trials=trials, mlflow_parent_run_id=record.parent_run_id,
        report_uri=record.report_uri, created_unix=record.created, finished_unix=record.finished,
        timing=record.timing, parallelism=record.spec.parallelism)


class TrainServiceServicer(train_pb2_grpc.TrainServiceServicer):
    def __init__(self, manager: RunManager, studies: StudyManager | None = None):
        self.manager = manager
        self.studies = studies

    def SubmitRun(self, request, context):
        view = self.manager.submit(request.config_yaml, list(request.overrides), request.backend,
                                   request.run_id, request.replicas, fork=request.fork)
        return to_proto(view)

    def GetRun(self, request, context):
        return to_proto(self.manager.get(request.run_id))

    def WatchRun(self, request, context):
        for kind, item in self.manager.watch(request.run_id, is_active=context.is_active):
            if kind == "run":
                yield train_pb2.RunEvent(run=to_proto(item))
            else:
                yield train_pb2.RunEvent(epoch=train_pb2.EpochMetrics(
                    epoch=int(item["epoch"]), metrics={k: float(v) for k, v in item.get("metrics", {}).items()}))

    def CancelRun(self, request, context):
        return to_proto(self.manager.cancel(request.run_id))

    def ListRuns(self, request, context):
        state = "" if request.state == train_pb2.RUN_STATE_UNSPECIFIED else \
            train_pb2.RunState.Name(request.state).removeprefix("RUN_STATE_")
        return train_pb2.ListRunsResponse(runs=[to_proto(v) for v in self.manager.list(state, request.limit)])

    # ---- studies

    def _studies(self) -> StudyManager:
        if self.studies is None:
            raise FailedPrecondition("this train service runs no studies")
        return self.studies

    def SubmitStudy(self, request, context):
        return study_to_proto(self._studies().submit(request.spec_yaml, request.backend))

    def GetStudy(self, request, context):
        return study_to_proto(self._studies().get(request.study_id))

    def WatchStudy(self, request, context):
        for kind, item in self._studies().watch(request.study_id, is_active=context.is_active):
            if kind == "study":
                yield train_pb2.StudyEvent(study=study_to_proto(item))
            else:
                yield train_pb2.StudyEvent(trial=train_pb2.Trial(
                    trial_id=item["trial_id"], state=item["state"], message=item.get("message", ""),
                    metrics={k: float(v) for k, v in item.get("metrics", {}).items()}))

    def CancelStudy(self, request, context):
        return study_to_proto(self._studies().cancel(request.study_id))

    def ListStudies(self, request, context):
        records = self._studies().list()
        return train_pb2.ListStudiesResponse(
            studies=[study_to_proto(r) for r in records[:request.limit or len(records)]])


def build_manager(default_backend: str = "local", max_concurrent: int = 1,
                  job_settings: JobSettings | None = None) -> RunManager:
    backends = {"local": LocalBackend(max_concurrent=max_concurrent)}
    try:
        backends["kubernetes"] = KubernetesBackend(job_settings or JobSettings())
    except FailedPrecondition as exc:
        backends["kubernetes"] = UnavailableBackend("kubernetes", str(exc))
    return RunManager(backends, default_backend=default_backend)


def build_studies(manager: RunManager) -> StudyManager:
    """The study manager over ``manager``; resumes the studies an earlier server left unfinished."""
    from shared.storage import open_store

    return StudyManager(manager, open_store())


def parse_args(argv: list[str] | None = None,
               env: dict[str, str] | None = None) -> tuple[argparse.Namespace, JobSettings]:
    """The service's arguments and its training Jobs' settings, from its flags and environment (``os.environ`` by
    default): what a deployment sets is what the Jobs get (tests/test_deploy*.py read a rendered pod through this)."""
    env = os.environ if env is None else env
    parser = service_arg_parser("train")
    parser.add_argument("--default-backend", default="local", choices=["local", "kubernetes"])
    parser.add_argument("--max-concurrent", type=int, default=1, help="local runs at once")
    parser.add_argument("--namespace", default=env.get("TRAINYARD_NAMESPACE", "trainyard"),
                        help="namespace of the training Jobs")
    parser.add_argument("--train-image", default=env.get("TRAINYARD_TRAIN_IMAGE", "trainyard-train:latest"),
                        help="image of the training Jobs")
    parser.add_argument("--gpus", type=int, default=int(env.get("TRAINYARD_TRAIN_GPUS", "1")),
                        help="nvidia.com/gpu per training pod (0 for CPU-only clusters)")
    args = parser.parse_args(argv)
    settings = replace(JobSettings(namespace=args.namespace, image=args.train_image, gpus_per_pod=args.gpus),
                       **settings_overrides(env.get(SETTINGS_ENV)))
    return args, settings


def main(argv: list[str] | None = None) -> None:
    args, settings = parse_args(argv)

    def register(server: grpc.Server) -> list[str]:
        manager = build_manager(args.default_backend, args.max_concurrent, settings)
        train_pb2_grpc.add_TrainServiceServicer_to_server(TrainServiceServicer(manager, build_studies(manager)),
                                                          server)
        return [train_pb2.DESCRIPTOR.services_by_name["TrainService"].full_name]

    serve("train", register, args)

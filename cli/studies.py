"""``trainyard study run|status|report|cancel|list``: studies through the train service."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from cli.output import add_output_options, emit, note, proto_dict, wants_json
from shared.errors import NotFound


def _stub(args):
    from shared.grpc_client import channel
    from shared.pb import train_pb2_grpc

    return train_pb2_grpc.TrainServiceStub(channel(args.server))


def format_study(study) -> str:
    counts: dict[str, int] = {}
    for t in study.trials:
        counts[t.state] = counts.get(t.state, 0) + 1
    lines = [f"study {study.study_id}  {study.state}  {len(study.trials)} trials ("
             + ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())) + f")  parallelism {study.parallelism}"]
    if study.message:
        lines.append(f"  {study.message}")
    lines.append(f"  mlflow parent run: {study.mlflow_parent_run_id}")
    if study.report_uri:
        lines.append(f"  report: {study.report_uri}")
    if study.timing:
        t = study.timing
        lines.append(f"  wall {t['study_wall_s']:.1f}s for {t['trials_sum_s']:.1f}s of trials "
                     f"(+{t['benchmark_sum_s']:.1f}s benchmarking); study overhead {t['study_overhead_s']:.1f}s = "
                     f"{t['study_overhead_pct']:.1f}% of the trial time")
    return "\n".join(lines)


def print_study(study) -> None:
    print(format_study(study))


def format_trials(study) -> str:
    lines = [f"  {'trial':<11} {'state':<10} overrides"]
    for t in study.trials:
        overrides = ", ".join(f"{k}={json.loads(v)}" for k, v in sorted(t.overrides.items()))
        lines.append(f"  {t.trial_id:<11} {t.state:<10} {overrides}" + (f"  ({t.message})" if t.message else ""))
    return "\n".join(lines)


def study_dict(study) -> dict:
    """Every field of the study and its trials; a trial's overrides as values, not the JSON text they travel as."""
    out = proto_dict(study)
    for trial in out["trials"]:
        trial["overrides"] = {k: json.loads(v) for k, v in trial["overrides"].items()}
    return out


def show_study(args, study, trials: bool = False) -> None:
    emit(args, study_dict(study), lambda: format_study(study) + ("\n" + format_trials(study) if trials else ""))


def _watch(args, stub, study_id: str) -> int:
    from tqdm import tqdm

    from shared.pb import train_pb2

    bar, last = None, None
    ended = ("SUCCEEDED", "FAILED", "CANCELLED", "PRUNED")
    done: set[str] = set()
    for event in stub.WatchStudy(train_pb2.WatchStudyRequest(study_id=study_id)):
        if event.HasField("study"):
            last = event.study
            done |= {t.trial_id for t in last.trials if t.state in ended}
            if bar is None:
                bar = tqdm(total=len(last.trials), initial=len(done), desc=f"study {study_id}", unit="trial")
        elif bar is not None:
            if event.trial.state in ended:
                done.add(event.trial.trial_id)
            bar.total = max(bar.total, len(done))
            bar.n = len(done)
            bar.set_postfix_str(f"{event.trial.trial_id} {event.trial.state.lower()}")
            bar.refresh()
    if bar is not None:
        bar.close()
    study = stub.GetStudy(train_pb2.GetStudyRequest(study_id=study_id))
    show_study(args, study)
    return 0 if study.state == "SUCCEEDED" else 1


def _cmd_study(args) -> int:
    from shared.pb import train_pb2

    if args.action == "run":
        from services.train.studies.manager import spec_for_submit

        path = Path(args.target)
        if not path.is_file():
            raise NotFound(f"study spec {path} does not exist")
        stub = _stub(args)
        study = stub.SubmitStudy(train_pb2.SubmitStudyRequest(spec_yaml=spec_for_submit(path.read_text(), str(path)),
                                                              backend=args.backend or ""))
        if args.watch:
            # JSON: one document, the study as it ended
            if not wants_json(args):
                print_study(study)
            return _watch(args, stub, study.study_id)
        show_study(args, study)
        return 0
    if args.action == "list":
        studies = _stub(args).ListStudies(train_pb2.ListStudiesRequest(limit=args.limit)).studies
        emit(args, [study_dict(s) for s in studies], lambda: "\n".join(format_study(s) for s in studies))
        return 0
    if not args.target:
        raise SystemExit(f"trainyard study {args.action} needs a study id")
    stub = _stub(args)
    if args.action == "status":
        show_study(args, stub.GetStudy(train_pb2.GetStudyRequest(study_id=args.target)), trials=True)
        return 0
    if args.action == "cancel":
        show_study(args, stub.CancelStudy(train_pb2.CancelStudyRequest(study_id=args.target)))
        return 0
    from services.train.studies.report import report_from_mlflow

    study = stub.GetStudy(train_pb2.GetStudyRequest(study_id=args.target))
    report = report_from_mlflow(args.tracking_uri, study.mlflow_parent_run_id)
    out = Path(args.out or f"study-{args.target}-report")
    for name, data in report.files().items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    tables = [{"title": t.title, "note": t.note, "headers": t.headers, "rows": t.rows} for t in report.tables]
    emit(args, {"study_id": args.target, "report": str(out / "report.md"), "html": str(out / "report.html"),
                "tables": tables}, lambda: "\n".join(t.markdown() for t in report.tables))
    note(args, f"report (rebuilt from MLflow): {out / 'report.md'} and {out / 'report.html'}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("study", help="run a study (a spec fanned out into runs), follow it, get its report")
    p.add_argument("action", choices=["run", "status", "report", "cancel", "list"])
    p.add_argument("target", nargs="?", help="run: the spec file (studies/*.yaml); status/report/cancel: the study id")
    p.add_argument("--backend", choices=["local", "kubernetes"], help="run: default the server's")
    p.add_argument("--watch", action="store_true", help="run: follow the study with a progress bar until it ends")
    p.add_argument("--out", help="report: directory to write report.md, report.html, plots/ and tables/ into")
    p.add_argument("--tracking-uri", default=None, help="report: MLflow tracking URI (default MLFLOW_TRACKING_URI)")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--server", default=os.environ.get("TRAINYARD_TRAIN_SERVER", "127.0.0.1:50053"))
    add_output_options(p)
    p.set_defaults(func=_cmd_study)

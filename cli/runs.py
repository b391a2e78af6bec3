"""``trainyard train`` and ``trainyard runs``: training runs through the train service."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from cli.output import add_output_options, emit, proto_dict, wants_json
from shared.errors import NotFound


def _train_stub(args):
    from shared.grpc_client import channel
    from shared.pb import train_pb2_grpc

    return train_pb2_grpc.TrainServiceStub(channel(args.server))


def _state(run) -> str:
    from shared.pb import train_pb2

    return train_pb2.RunState.Name(run.state).removeprefix("RUN_STATE_")


def format_run(run) -> str:
    lines = [f"run {run.run_id}  {_state(run)}  backend={run.backend}  model={run.model}  "
             f"epoch {run.epoch}/{run.epochs}"]
    if run.metrics:
        lines.append("  " + "  ".join(f"{k}={v:.4g}" for k, v in sorted(run.metrics.items())))
    if run.message:
        lines.append(f"  {run.message}")
    if run.mlflow_run_id:
        lines.append(f"  mlflow run: {run.mlflow_run_id}")
    if run.model_uri:
        lines.append(f"  model: {run.model_uri}")
    if run.forked_from:
        lines.append(f"  forked from: {run.forked_from}")
    if run.selection_split == "test":
        lines.append(f"  {TEST_SELECTED}")
    return "\n".join(lines)


def run_dict(run) -> dict:
    """Every field of the run; its state as the text shows it (SUCCEEDED, not RUN_STATE_SUCCEEDED)."""
    return proto_dict(run) | {"state": _state(run)}


def show_run(args, run) -> None:
    emit(args, run_dict(run), lambda: format_run(run))


TEST_SELECTED = "selected on the test split (data.val_split: test): its val_* figures are test figures, and no " \
                "held-out estimate of it remains"


def selection_label(split: str) -> str:
    """The "selected on" cell: ``test (!)`` flags a run that selects on the test split (TEST_SELECTED says why);
    ``?`` a run recorded before the split was."""
    return {"test": "test (!)", "": "?"}.get(split, split)


def format_runs(runs) -> str:
    """One line a run; a run that selects on the test split is flagged ``test (!)`` in the ``selected on`` column
    and explained below the table."""
    lines = [f"{'run id':<34} {'state':<10} {'backend':<10} {'model':<24} {'epoch':>7}  {'val_acc':<7}  selected on"]
    for r in runs:
        acc = f"{r.metrics['val_acc']:.4f}" if "val_acc" in r.metrics else "-"
        lines.append(f"{r.run_id:<34} {_state(r):<10} {r.backend:<10} {r.model:<24} {r.epoch:>3}/{r.epochs:<3}  "
                     f"{acc:<7}  {selection_label(r.selection_split)}")
    if any(r.selection_split == "test" for r in runs):
        lines.append(f"(!) {TEST_SELECTED}")
    return "\n".join(lines)


def watch(args, stub, run_id: str) -> int:
    """Follow a run with a progress bar over epochs (on stderr), then show it; exit code 0 only when it
    succeeded."""
    from tqdm import tqdm

    from shared.pb import train_pb2

    bar = None
    last = None
    for event in stub.WatchRun(train_pb2.WatchRunRequest(run_id=run_id)):
        if event.HasField("run"):
            last = event.run
            if bar is None:
                bar = tqdm(total=last.epochs, initial=last.epoch, desc=run_id, unit="epoch")
            bar.set_postfix_str(_state(last))
        elif bar is not None:
            bar.n = event.epoch.epoch
            m = event.epoch.metrics
            bar.set_postfix({k: f"{m[k]:.4f}" for k in ("train_loss", "val_acc") if k in m})
            bar.refresh()
    if bar is not None:
        bar.close()
    if last is not None:
        last = stub.GetRun(train_pb2.GetRunRequest(run_id=run_id))
        show_run(args, last)
    return 0 if last is not None and last.state == train_pb2.RUN_STATE_SUCCEEDED else 1


def _cmd_train(args) -> int:
    from shared.pb import train_pb2

    if bool(args.config) == bool(args.config_file):
        raise SystemExit("trainyard train needs one config: trainyard train CONFIG (or --config CONFIG)")
    path = Path(args.config or args.config_file)
    if not path.is_file():
        raise NotFound(f"config file {path} does not exist")
    stub = _train_stub(args)
    run = stub.SubmitRun(train_pb2.SubmitRunRequest(
        config_yaml=path.read_text(), overrides=args.set, backend=args.backend or "", run_id=args.run_id or "",
        replicas=args.replicas, fork=args.fork))
    if args.watch:
        # JSON: one document, the run as it ended
        if not wants_json(args):
            print(format_run(run))
        return watch(args, stub, run.run_id)
    show_run(args, run)
    return 0


def _cmd_runs(args) -> int:
    from shared.pb import train_pb2

    stub = _train_stub(args)
    if args.action == "list":
        runs = stub.ListRuns(train_pb2.ListRunsRequest(limit=args.limit)).runs
        emit(args, [run_dict(r) for r in runs], lambda: format_runs(runs))
        return 0
    if not args.run_id:
        raise SystemExit(f"trainyard runs {args.action} needs a run id")
    if args.action == "show":
        show_run(args, stub.GetRun(train_pb2.GetRunRequest(run_id=args.run_id)))
        return 0
    if args.action == "watch":
        return watch(args, stub, args.run_id)
    show_run(args, stub.CancelRun(train_pb2.CancelRunRequest(run_id=args.run_id)))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    train_addr = os.environ.get("TRAINYARD_TRAIN_SERVER", "127.0.0.1:50053")
    p = sub.add_parser("train", help="submit a training run to the train service")
    p.add_argument("config_file", nargs="?", metavar="CONFIG", help="YAML training config (see configs/)")
    p.add_argument("--config", help="the same, as a flag")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--backend", choices=["local", "kubernetes"], help="default: the server's")
    p.add_argument("--replicas", type=int, default=1, help="data-parallel processes / pods")
    p.add_argument("--run-id", help="resume this run from its newest checkpoint (with the config it was trained with)")
    p.add_argument("--fork", action="store_true",
                   help="with --run-id: start a new run from scratch with this config (a new id, <run-id>-fork-<hex>) "
                        "instead of resuming; the old run stays as it is")
    p.add_argument("--watch", action="store_true", help="follow the run with a progress bar until it ends")
    p.add_argument("--server", default=train_addr, help="train service address")
    add_output_options(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("runs", help="list, show, watch or cancel training runs")
    p.add_argument("action", choices=["list", "show", "watch", "cancel"])
    p.add_argument("run_id", nargs="?")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--server", default=train_addr, help="train service address")
    add_output_options(p)
    p.set_defaults(func=_cmd_runs)

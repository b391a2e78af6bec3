"""The `trainyard` command line."""
from __future__ import annotations

import argparse
import os
import sys

import grpc

from shared import logs
from shared.errors import TrainyardError


def _cmd_up(args) -> int:
    from shared.local_stack import up

    state = up(args.services or None, deadline_s=args.deadline)
    print(f"{'service':<10} {'gRPC':<18} {'metrics':<32} pid")
    for name, info in state.items():
        print(f"{name:<10} {info['address']:<18} {info['metrics']:<32} {info['pid']}")
    return 0


def _cmd_status(args) -> int:
    from shared.local_stack import status

    rows = status()
    print(f"{'service':<10} {'address':<18} health")
    for name, info in rows.items():
        print(f"{name:<10} {info['address']:<18} {info['health']}")
    return 0 if all(r["health"] == "SERVING" for r in rows.values()) else 1


def _cmd_down(args) -> int:
    from shared.local_stack import down

    stopped = down(grace_s=args.grace)
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def _train_stub(args):
    from shared.grpc_client import channel
    from shared.pb import train_pb2_grpc

    return train_pb2_grpc.TrainServiceStub(channel(args.server))


def _print_run(run) -> None:
    from shared.pb import train_pb2

    state = train_pb2.RunState.Name(run.state).removeprefix("RUN_STATE_")
    print(f"run {run.run_id}  {state}  backend={run.backend}  model={run.model}  epoch {run.epoch}/{run.epochs}")
    if run.metrics:
        print("  " + "  ".join(f"{k}={v:.4g}" for k, v in sorted(run.metrics.items())))
    if run.message:
        print(f"  {run.message}")
    if run.mlflow_run_id:
        print(f"  mlflow run: {run.mlflow_run_id}")
    if run.model_uri:
        print(f"  model: {run.model_uri}")


def _watch(stub, run_id: str) -> int:
    """Follow a run with a progress bar over epochs; exit code 0 only when it succeeded."""
    from tqdm import tqdm

    from shared.pb import train_pb2

    bar = None
    last = None
    for event in stub.WatchRun(train_pb2.WatchRunRequest(run_id=run_id)):
        if event.HasField("run"):
            last = event.run
            if bar is None:
                bar = tqdm(total=last.epochs, initial=last.epoch, desc=run_id, unit="epoch")
            bar.set_postfix_str(train_pb2.RunState.Name(last.state).removeprefix("RUN_STATE_"))
        else:
            if bar is not None:
                bar.n = event.epoch.epoch
                m = event.epoch.metrics
                bar.set_postfix({k: f"{m[k]:.4f}" for k in ("train_loss", "val_acc") if k in m})
                bar.refresh()
    if bar is not None:
        bar.close()
    if last is not None:
        last = stub.GetRun(train_pb2.GetRunRequest(run_id=run_id))
        _print_run(last)
    return 0 if last is not None and last.state == train_pb2.RUN_STATE_SUCCEEDED else 1


def _cmd_train(args) -> int:
    from pathlib import Path

    from shared.errors import NotFound
    from shared.pb import train_pb2

    path = Path(args.config)
    if not path.is_file():
        raise NotFound(f"config file {path} does not exist")
    stub = _train_stub(args)
    run = stub.SubmitRun(train_pb2.SubmitRunRequest(
        config_yaml=path.read_text(), overrides=args.set, backend=args.backend or "", run_id=args.run_id or "",
        replicas=args.replicas))
    _print_run(run)
    return _watch(stub, run.run_id) if args.watch else 0


def _cmd_runs(args) -> int:
    from shared.pb import train_pb2

    stub = _train_stub(args)
    if args.action == "list":
        runs = stub.ListRuns(train_pb2.ListRunsRequest(limit=args.limit)).runs
        print(f"{'run id':<34} {'state':<10} {'backend':<10} {'model':<24} {'epoch':>7}  val_acc")
        for r in runs:
            state = train_pb2.RunState.Name(r.state).removeprefix("RUN_STATE_")
            acc = f"{r.metrics['val_acc']:.4f}" if "val_acc" in r.metrics else "-"
            print(f"{r.run_id:<34} {state:<10} {r.backend:<10} {r.model:<24} {r.epoch:>3}/{r.epochs:<3}  {acc}")
        return 0
    if not args.run_id:
        raise SystemExit(f"trainyard runs {args.action} needs a run id")
    if args.action == "show":
        _print_run(stub.GetRun(train_pb2.GetRunRequest(run_id=args.run_id)))
        return 0
    if args.action == "watch":
        return _watch(stub, args.run_id)
    _print_run(stub.CancelRun(train_pb2.CancelRunRequest(run_id=args.run_id)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainyard", description="experiment platform for small vision models")
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("up", help="start all five services locally on embedded defaults")
    p.add_argument("services", nargs="*", help="only these services")
    p.add_argument("--deadline", type=float, default=120.0, help="seconds to wait for SERVING")
    p.set_defaults(func=_cmd_up)

    p = sub.add_parser("status", help="print each service's health")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("down", help="stop the services `up` started")
    p.add_argument("--grace", type=float, default=20.0)
    p.set_defaults(func=_cmd_down)

    train_addr = os.environ.get("TRAINYARD_TRAIN_SERVER", "127.0.0.1:50053")
    p = sub.add_parser("train", help="submit a training run to the train service")
    p.add_argument("--config", required=True, help="YAML training config (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--backend", choices=["local", "kubernetes"], help="default: the server's")
    p.add_argument("--replicas", type=int, default=1, help="data-parallel processes / pods")
    p.add_argument("--run-id", help="resume this run from its newest checkpoint")
    p.add_argument("--watch", action="store_true", help="follow the run with a progress bar until it ends")
    p.add_argument("--server", default=train_addr, help="train service address")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("runs", help="list, show, watch or cancel training runs")
    p.add_argument("action", choices=["list", "show", "watch", "cancel"])
    p.add_argument("run_id", nargs="?")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--server", default=train_addr, help="train service address")
    p.set_defaults(func=_cmd_runs)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.configure(args.log_level)
    try:
        return args.func(args) or 0
    except TrainyardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            print(f"error: service unreachable ({exc.details()}); start it with `trainyard up` or pass --server",
                  file=sys.stderr)
        else:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

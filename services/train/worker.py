"""The training worker: ``python -m services.train.worker --run-id ID --config FILE [--set k=v ...]``
(or ``--config-env VAR`` to read the YAML from an environment variable, as the Kubernetes Job does).

The TrainService starts it as a local process (``torchrun --nproc-per-node N -m services.train.worker ...``
for data-parallel runs) or as a Kubernetes Job. Running it again with the same run id resumes from the
newest complete checkpoint and continues the same MLflow run.

Exit codes: 0 succeeded, 1 failed, 2 bad config/arguments, 130 cancelled (SIGTERM/SIGINT between epochs).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

from shared.errors import Cancelled, FailedPrecondition, InvalidArgument, NotFound, TrainyardError
from shared.logs import configure, get_logger

log = get_logger("services.train.worker")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m services.train.worker", description=__doc__.splitlines()[0])
    p.add_argument("--run-id", required=True, help="run id; an existing one resumes that run")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="training config YAML file")
    src.add_argument("--config-env", metavar="VAR",
                     help="read the config YAML from this environment variable (Kubernetes Jobs)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set optimizer.lr=0.1")
    p.add_argument("--events", default=None, help="events JSONL path (default $TRAINYARD_HOME/runs/<id>/events.jsonl)")
    p.add_argument("--store", default=None, help="artifact store URL (default TRAINYARD_STORE)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default MLFLOW_TRACKING_URI)")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.add_argument("--no-export", action="store_true", help="do not publish the model at the end")
    return p


def main(argv: list[str] | None = None) -> int:
    configure()
    args = build_parser().parse_args(argv)
    from services.train.checkpoint import ensure_resumable
    from services.train.config import load_train_config, parse_train_config
    from services.train.engine import Engine
    from shared.config import config_hash, load_yaml
    from shared.names import validate_name
    from shared.storage import open_store

    try:
        if args.config_env:
            if args.config_env not in os.environ:
                raise NotFound(f"environment variable {args.config_env} (the config) is not set")
            cfg = parse_train_config(load_yaml(os.environ[args.config_env], f"${args.config_env}"),
                                     args.overrides)
        else:
            cfg = load_train_config(args.config, args.overrides)
        validate_name(args.run_id, "run id")
        store = open_store(args.store)
        # However it was launched (the service checks first; a Job applied by hand, a worker run by hand), a run
        # resumes only under the config its checkpoints were trained with.
        ensure_resumable(store, args.run_id, config_hash(cfg),
                         "run it with that config to resume it, or under another run id to start afresh")
    except (InvalidArgument, NotFound, FailedPrecondition) as exc:
        log.error("bad config", extra={"error": str(exc)})
        print(f"error: {exc}", file=sys.stderr)
        return 2

    # SIGTERM (pod deletion, CancelRun) stops between epochs: the epoch in flight is not checkpointed anyway,
    # and the newest complete checkpoint stays resumable.
    stop = {"flag": False}

    def on_signal(signum, _frame):
        if stop["flag"]:
            raise KeyboardInterrupt  # a second signal: stop now
        stop["flag"] = True
        log.warning("stop requested; finishing the current epoch", extra={"signal": signum, "run_id": args.run_id})

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    try:
        engine = Engine(cfg, args.run_id, store=store, events_path=args.events, tracking=not args.no_tracking,
                        tracking_uri=args.tracking_uri, export=False if args.no_export else None,
                        stop_flag=lambda: stop["flag"])
        result = engine.run()
    except (Cancelled, KeyboardInterrupt) as exc:
        log.warning("run cancelled", extra={"run_id": args.run_id, "error": str(exc)})
        return 130
    except TrainyardError as exc:
        log.error("run failed", extra={"run_id": args.run_id, "error": str(exc)}, exc_info=True)
        return 2 if isinstance(exc, InvalidArgument) else 1
    except Exception as exc:  # noqa: BLE001 - the process boundary: log it, report failure by exit code
        log.error("run failed", extra={"run_id": args.run_id, "error": repr(exc)}, exc_info=True)
        return 1
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    log.info("run succeeded", extra={"run_id": args.run_id, "epochs": result.epochs_done,
                                     "best_metric": result.best_metric, "model_version": result.model_version})
    return 0


if __name__ == "__main__":
    sys.exit(main())

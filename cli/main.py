"""The `trainyard` command line: one subcommand group per module of this package."""
from __future__ import annotations

import argparse
import sys

import grpc

from cli import bench, datasets, jobs, local_stack, models, predict, runs, studies
from shared import logs
from shared.errors import TrainyardError

COMMAND_GROUPS = (local_stack, runs, studies, models, datasets, jobs, bench, predict)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainyard", description="experiment platform for small vision models")
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        group.add_commands(sub)
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

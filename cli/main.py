"""The `trainyard` command line: one subcommand group per module of this package."""
from __future__ import annotations

import argparse
import os
import sys

import argcomplete
import grpc

from cli import bench, completion, datasets, jobs, local_stack, models, predict, runs, studies
from cli.version import VersionAction
from shared import logs
from shared.errors import TrainyardError

COMMAND_GROUPS = (local_stack, runs, studies, models, datasets, jobs, bench, predict, completion)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainyard", description="experiment platform for small vision models")
    parser.add_argument("--version", action=VersionAction, help="print the version (package, git commit, Python, "
                                                               "torch) and exit")
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("--log-format", choices=logs.FORMATS, default="auto",
                        help="auto (default): readable lines when stderr is a terminal, JSON lines otherwise")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        group.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Under the shell's completion protocol (_ARGCOMPLETE set) this prints the completions and exits.
    argcomplete.autocomplete(parser)
    args = parser.parse_args(argv)
    logs.configure(args.log_level, fmt=args.log_format)
    try:
        return args.func(args) or 0
    except TrainyardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader stopped early (`trainyard runs list --json | head`): no traceback. Python's own advice:
        # point stdout at devnull so that the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            print(f"error: service unreachable ({exc.details()}); start it with `trainyard up` or pass --server",
                  file=sys.stderr)
        else:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

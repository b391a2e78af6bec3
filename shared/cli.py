"""The `trainyard` command line."""
from __future__ import annotations

import argparse
import sys

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


if __name__ == "__main__":
    sys.exit(main())

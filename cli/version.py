"""``trainyard --version``: the installed package, the checkout's commit when run from one, Python and torch."""
from __future__ import annotations

import argparse
import platform
import subprocess
import sys
from pathlib import Path

from shared.versions import installed, trainyard_version

ROOT = Path(__file__).resolve().parent.parent


def git_commit(root: Path = ROOT) -> str | None:
    """``git describe --always --dirty`` of the checkout this package runs from; None outside a checkout
    (an installed wheel) or without git."""
    if not (root / ".git").exists():
        return None
    try:
        done = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def version_text() -> str:
    # torch's version from its metadata: importing torch would take seconds
    parts = [f"trainyard {trainyard_version()}"]
    commit = git_commit()
    if commit:
        parts.append(f"commit {commit}")
    parts.append(f"python {platform.python_version()}")
    torch = installed("torch")
    if torch:
        parts.append(f"torch {torch}")
    return ", ".join(parts)


class VersionAction(argparse.Action):
    """Like argparse's ``version`` action, but the text (a git call) is made only when asked for."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text(), file=sys.stdout)
        parser.exit()

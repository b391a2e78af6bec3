"""``trainyard completion bash|zsh|fish``: the shell code that completes ``trainyard``'s commands and options
(argcomplete's; the completions come from the same argparse parser that runs the command)."""
from __future__ import annotations

import argparse

SHELLS = ("bash", "zsh", "fish")


def _cmd_completion(args) -> int:
    import argcomplete

    print(argcomplete.shellcode(["trainyard"], shell=args.shell))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("completion", help="print the shell completion script: eval \"$(trainyard completion bash)\" "
                                          "(zsh likewise; fish: trainyard completion fish | source)")
    p.add_argument("shell", choices=SHELLS)
    p.set_defaults(func=_cmd_completion)

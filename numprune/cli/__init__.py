"""The command line: one module per command, parsing and printing only; the library does the work.

This package is the only code that knows flag names. A ``NumpruneError`` from the library, or a
value the parser refuses, becomes one line ``numprune: error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from numprune import exit_if_command_interrupted
from numprune.errors import NumpruneError
from numprune.io import output
from numprune.version import VERSION

try:
    from transformers.utils import logging as transformers_logging

    from numprune.cli import bench, compare, export, generate, heal, info, ppl, prune, train_digits, zeroshot
except KeyboardInterrupt:
    exit_if_command_interrupted()
    raise

COMMANDS = (prune, heal, ppl, compare, info, bench, export, zeroshot, generate, train_digits)


class Parser(argparse.ArgumentParser):
    """argparse, but a refused argument prints one line instead of the whole usage block."""

    def error(self, message: str):
        self.exit(2, f"numprune: error: {one_line(message)}\n")


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as done:  # --help, or a value the parser refused (already printed)
        return done.code
    if getattr(args, "quiet", False):
        transformers_logging.disable_progress_bar()
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.run(args)
    except NumpruneError as error:
        print(f"numprune: error: {one_line(str(error))}{_process_note()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        terminated = isinstance(stop, Terminated)
        done = one_line(", ".join(str(path) for path in output.committed if os.path.lexists(path)))  # not scratch files
        print(f"numprune: {'terminated' if terminated else 'interrupted'}; "
              f"{f'{done} had been written completely' if done else 'nothing was written'}", file=sys.stderr)
        return 143 if terminated else 130


def one_line(text: str) -> str:
    """``text`` with its control characters escaped as Python writes them (a path may hold a newline), so that a
    message stays the one line a script reading stderr expects."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class Terminated(KeyboardInterrupt):
    """SIGTERM, unwound like Ctrl-C (temporary outputs removed on the way out) and reported the same way."""


def _terminate(*_) -> None:
    raise Terminated


def parser() -> argparse.ArgumentParser:
    root = Parser(prog="numprune", description="Numerical structured pruning of autoregressive transformers: whole "
                  "heads and MLP channels removed, kept weights corrected.")
    root.add_argument("--version", action="version", version=f"numprune {VERSION}")
    commands = root.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(commands)
    return root


def _process_note() -> str:
    """Under torchrun, which process speaks (none for process 0, which prints the summary)."""
    rank, size = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    return f" (process {rank} of {size})" if rank != "0" else ""

"""The ``pdserve`` command: one entry point, one sub-command per concern.

Each concern registers its own sub-commands (``register(subparsers)``) so this file stays a
table of contents. Sub-commands return an exit code; a :class:`PdserveError` is printed as one
message without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from collections.abc import Sequence

from pdserve import __version__
from pdserve.errors import ConfigErrors, PdserveError, ShortErrorParser, plural
from pdserve.logs import ENV_LOG_LEVEL, LEVELS, configure_logging

# module that provides ``register(subparsers)`` for each top-level command group
_COMMAND_MODULES = (
    "pdserve.ranktable.cli",
    "pdserve.model.cli",
    "pdserve.scheduler.cli",
    "pdserve.worker.cli",
    "pdserve.up",
)


def build_parser() -> argparse.ArgumentParser:
    parser = ShortErrorParser(
        prog="pdserve",
        description="Prefill/decode disaggregated LLM serving on vLLM.",
    )
    parser.add_argument("--version", action="version", version=f"pdserve {__version__}")
    parser.add_argument(
        "--log-level",
        default=None,
        metavar="LEVEL",
        help=f"logging level: {', '.join(LEVELS)} (env {ENV_LOG_LEVEL}, default INFO)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ShortErrorParser)
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a concern not built yet must not break the others
            if exc.name and exc.name.startswith("pdserve"):
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit code (2 for a user error, 141 when stdout's reader went away)."""
    try:
        code = _run(argv)
        sys.stdout.flush()  # a pipe buffers stdout: fail here, not in the interpreter's exit-time flush
        return code
    except BrokenPipeError:
        return _stdout_closed()


def _stdout_closed() -> int:
    """`pdserve ... | head` read what it wanted and left: stop quietly, as Unix tools killed by
    SIGPIPE do (exit 128 + SIGPIPE = 141, so `set -o pipefail` scripts see the same as with `cat`)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # the exit-time flush of what is still buffered goes nowhere
    os.close(devnull)
    return 128 + signal.SIGPIPE


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        configure_logging(args.log_level, os.environ)
    except PdserveError as exc:
        print(f"pdserve: error: {exc}", file=sys.stderr)
        return exc.exit_code
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    try:
        return int(args.func(args) or 0)
    except ConfigErrors as exc:  # already one "error:" block per problem
        print(f"{exc}\npdserve: {plural(len(exc.errors), 'error')}", file=sys.stderr)
        return exc.exit_code
    except PdserveError as exc:
        print(f"pdserve: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130

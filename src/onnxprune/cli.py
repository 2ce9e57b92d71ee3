"""Command-line interface: ``onnxprune <command> ...``.

A registered transform (:mod:`onnxprune.registry`) gets its subcommand generated from its
config; the other commands live in ``onnxprune.commands.<name>`` with
``register(subparsers)`` and ``run(args) -> int``; every command is a thin layer over the
public Python API. A command
may also set ``files(args) -> RunFiles``: the paths it reads and writes, checked before it
runs (no output may be an input or another output) and published as one unit
(:func:`onnxprune.io.outputs.output_transaction`). Errors from the library are printed as
one line on stderr and turned into the documented exit codes: 0 ok, 1 budget or
verification failed, 2 usage error or bad input, 130 interrupted, 143 terminated (SIGTERM);
an interrupted or failed run leaves no output and no temporary file behind.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import signal
import sys
import traceback
from collections.abc import Iterator, Sequence
from types import FrameType

from onnxprune import __version__, registry
from onnxprune.errors import BudgetError, OnnxPruneError
from onnxprune.failures import RUNTIME_ERRORS, EscapingFormatter, one_line, runtime_failure
from onnxprune.io.outputs import RunFiles, output_transaction
from onnxprune.registry.cli import register_command

__all__ = ["build_parser", "main"]

#: Command modules, in the order ``--help`` lists them.
COMMANDS = (
    "optimize",
    "inspect",
    "canonicalize",
    "prune",
    "sensitivity",
    "bench",
    "verify",
    "sparsify",
    "lowrank",
    "quantize",
    "recover",
    "fp16",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onnxprune", description="Framework-agnostic ONNX model optimizer."
    )
    parser.add_argument("--version", action="version", version=f"onnxprune {__version__}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="more logging (-vv: also the traceback of an error)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    generated = set(registry.names())
    for name in COMMANDS:
        if name in generated and registry.get(name).command == "generated":
            register_command(sub, registry.get(name))
        else:
            importlib.import_module(f"onnxprune.commands.{name}").register(sub)
    return parser


class Terminated(BaseException):
    """SIGTERM arrived: unwind like Ctrl-C so temporary files and partial outputs go."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` while a command runs (main thread only)."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: leave signal handling alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    files = args.files(args) if hasattr(args, "files") else RunFiles()
    # A failed budget or verification (exit 1) keeps the report it wrote.
    with output_transaction(files, keep_on=(BudgetError,)):
        return int(args.run(args))


def _traceback_if_asked(args: argparse.Namespace) -> None:
    """With ``-vv`` the one-line error is preceded by its traceback (for bug reports)."""
    if args.verbose >= 2:
        traceback.print_exc(file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(EscapingFormatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2), handlers=[handler])
    try:
        with _sigterm_unwinds():
            return _run(args)
    except OnnxPruneError as exc:
        _traceback_if_asked(args)
        print(f"onnxprune {args.command}: error: {one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except RUNTIME_ERRORS as exc:  # the last resort: validation names most culprits first
        _traceback_if_asked(args)
        print(f"onnxprune {args.command}: error: {runtime_failure(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("onnxprune: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("onnxprune: terminated", file=sys.stderr)
        return 143


if __name__ == "__main__":
    sys.exit(main())

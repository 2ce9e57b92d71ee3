"""Command-line interface: ``onnxprune <command> ...``.

Each command lives in ``onnxprune.commands.<name>`` with ``register(subparsers)`` and
``run(args) -> int``; every command is a thin layer over the public Python API. Errors from
the library are printed as one line on stderr and turned into the documented exit codes:
0 ok, 1 budget or verification failed, 2 usage error or bad input.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from onnxprune import __version__
from onnxprune.errors import OnnxPruneError

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
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onnxprune", description="Framework-agnostic ONNX model optimizer."
    )
    parser.add_argument("--version", action="version", version=f"onnxprune {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"onnxprune.commands.{name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.run(args))
    except OnnxPruneError as exc:
        print(f"onnxprune {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("onnxprune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The CLI subcommand of a registered transform, generated from its config fields.

Every transform command reads ``MODEL`` and writes ``-o OUT``; the shared option groups
(``--calib``, ``--eval``, ``--report``, ``--dim``) are declared once in
:mod:`onnxprune.commands.common` and added by what the transform uses; the remaining flags
are the config's fields (:func:`onnxprune.registry.options.add_config_arguments`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from onnxprune.commands.common import (
    add_calib_option,
    add_dims_option,
    add_eval_option,
    add_report_option,
    model_run_files,
    parse_dims,
)
from onnxprune.commands.recover import add_recover_option, run_pass
from onnxprune.registry.driver import run_file
from onnxprune.registry.options import (
    add_config_arguments,
    config_from_namespace,
    field_specs,
)
from onnxprune.registry.transform import Transform

__all__ = ["SHARED_DESTS", "config_from_args", "register_command"]

#: argparse destinations of the shared options (not config fields).
SHARED_DESTS = frozenset(
    {"model", "output", "calib", "eval_data", "report", "dim", "recover", "recover_budget"}
)


def register_command(sub: argparse._SubParsersAction, transform: Transform) -> None:
    """Add ``onnxprune <transform.name>`` to ``sub``."""
    parser = sub.add_parser(transform.name, help=transform.help, description=transform.description)
    parser.add_argument("model", help="input .onnx file (never modified)")
    parser.add_argument("-o", "--output", required=True, help="output .onnx file")
    if transform.data == "calib":
        add_calib_option(parser, exact=transform.fidelity == "exact")
    if transform.fidelity == "lossy":
        add_eval_option(parser)
        add_recover_option(parser)
    add_report_option(parser)
    if transform.apply is not None or "dims" in {s.name for s in field_specs(transform.config)}:
        add_dims_option(parser)
    add_config_arguments(parser, transform.config)

    def run(args: argparse.Namespace) -> int:
        config = config_from_args(transform, args)

        def write(output: str | Path) -> Any:
            return run_file(
                transform,
                args.model,
                output,
                config,
                calib=getattr(args, "calib", None),
                eval_data=getattr(args, "eval_data", None),
                dims=parse_dims(getattr(args, "dim", [])),
            )

        run_pass(args, write)
        return 0

    parser.set_defaults(run=run, files=model_run_files)


def config_from_args(transform: Transform, args: argparse.Namespace) -> Any:
    """The config the parsed flags describe, completed by the transform's ``from_cli``."""
    config = config_from_namespace(transform.config, args)
    return transform.from_cli(config) if transform.from_cli is not None else config

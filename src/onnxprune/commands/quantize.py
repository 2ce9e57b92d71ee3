"""``onnxprune quantize``: static int8 QDQ (or dynamic int8, or fp16) quantization.

Its flags are generated from :class:`~onnxprune.quant.config.QuantizeConfig` (the registered
``quantize`` transform); ``--calib`` is required.
"""

from __future__ import annotations

import argparse

from onnxprune.commands.common import (
    add_eval_option,
    add_report_option,
    model_run_files,
    write_json,
)
from onnxprune.quant.config import QuantizeConfig, quantize_config_file
from onnxprune.registry.options import add_config_arguments, config_from_namespace
from onnxprune.transforms import QUANTIZE

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("quantize", help=QUANTIZE.help, description=QUANTIZE.description)
    parser.add_argument("model", help="input float .onnx file (never modified)")
    parser.add_argument("-o", "--output", required=True, help="output .onnx file")
    parser.add_argument("--calib", required=True, help="calibration .npz or folder of .npz")
    add_config_arguments(parser, QuantizeConfig)
    add_eval_option(parser)
    add_report_option(parser)
    parser.set_defaults(run=run, files=model_run_files)


def run(args: argparse.Namespace) -> int:
    config = config_from_namespace(QuantizeConfig, args)
    result = quantize_config_file(
        args.model, args.output, config, calib=args.calib, eval_data=args.eval_data
    )
    print(result.summary())
    if args.report:
        write_json(args.report, result.to_dict())
    return 0

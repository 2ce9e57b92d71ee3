"""The built-in transforms, registered once (:mod:`onnxprune.registry`).

Each entry names a capability's config and how it runs; the CLI subcommand, the recipe step
and the top-level ``*_file`` function are derived from it. ``prune`` keeps its own
command module for what is not a config field (``--save-plan``, ``--recover``), with its
flags generated from :class:`~onnxprune.prune.config.PruneConfig`; ``quantize`` keeps
one for its required ``--calib``, with its flags generated from
:class:`~onnxprune.quant.config.QuantizeConfig`.
"""

from __future__ import annotations

import dataclasses

from onnxprune.lowrank import api as lowrank
from onnxprune.lowrank.config import _RULES, LowRankConfig
from onnxprune.passes.pipeline import CanonicalizeConfig, canonicalize_apply, check_config
from onnxprune.prune.api import prune_file
from onnxprune.prune.config import PruneConfig
from onnxprune.quant.config import QuantizeConfig, quantize_config_file
from onnxprune.quant.fp16 import Fp16Config, fp16_apply
from onnxprune.registry.transform import Transform, register
from onnxprune.sparsity import api as sparsity
from onnxprune.sparsity.prune import SparsifyConfig

__all__ = ["CANONICALIZE", "FP16", "LOWRANK", "PRUNE", "QUANTIZE", "SPARSIFY"]


def _lowrank_from_cli(config: LowRankConfig) -> LowRankConfig:
    """``--fold`` without a rank rule only folds."""
    if config.fold and all(getattr(config, rule) is None for rule in _RULES):
        return dataclasses.replace(config, factorize=False)
    return config


CANONICALIZE = register(
    Transform(
        name="canonicalize",
        help="fold BatchNorm/affine ops and zero Pads, fuse activations, fold constants, clean up",
        description="Apply the exact canonicalization passes, check the result against the "
        "original in onnxruntime, and write it atomically. Exit 1 (nothing written) if the "
        "outputs changed.",
        config=CanonicalizeConfig,
        apply=canonicalize_apply,
        fidelity="exact",
        validate=check_config,
    )
)

FP16 = register(
    Transform(
        name="fp16",
        help="float16 weights and compute (float32 inputs and outputs)",
        description="Convert float32 initializers and compute to float16; nodes whose values "
        "overflow float16 on the calibration feeds stay float32, as do inputs and outputs. "
        "Halves the size; faster on GPUs (onnxruntime CPU inserts casts). Fidelity is "
        "measured on held-out data and reported; the input is never modified.",
        config=Fp16Config,
        apply=fp16_apply,
    )
)

PRUNE = register(
    Transform(
        name="prune",
        help="remove channels, filters and attention heads",
        description="Find the channels that must go together (residual adds, concat/split, "
        "depthwise convs, BatchNorm, flatten into a classifier, attention heads, MLP hidden "
        "units), score them, remove them physically and optionally refit the next layers "
        "on calibration data. Groups that cannot be pruned are reported with the node "
        "and the reason.",
        config=PruneConfig,
        run_file=prune_file,
        command="own",
    )
)

QUANTIZE = register(
    Transform(
        name="quantize",
        help="int8 QDQ quantization (static or dynamic) or float16 conversion",
        description="Quantize a float model with calibration data, check it against the float "
        "model on that data (output SQNR/cosine), and write it atomically. Exit 1, nothing "
        "written, when the output collapses or --budget cannot be met; exit 2 on bad input "
        "(already quantized model, all-NaN tensor, bad option).",
        config=QuantizeConfig,
        run_file=quantize_config_file,
        command="own",
    )
)

SPARSIFY = register(
    Transform(
        name="sparsify",
        help="prune Conv/Gemm/MatMul weights to a sparsity (magnitude, Wanda, OBS update, 2:4)",
        description="Zero the least important weights of Conv/ConvTranspose/Gemm/MatMul "
        "layers, store them compactly (bitmask, reconstructed exactly at session load), "
        "report fidelity against the original, and write the model atomically. onnxruntime "
        "CPU does not run faster on zeros; 2:4 targets TensorRT sparse tensor cores.",
        config=SparsifyConfig,
        apply=sparsity.sparsify_apply,
        validate=sparsity.validate,
    )
)

LOWRANK = register(
    Transform(
        name="lowrank",
        help="factorize MatMul/Gemm (and Conv) weights by truncated SVD; fold linear chains",
        description="Replace dense weights by low-rank factors (MatMul/Gemm: two MatMuls; "
        "Conv: spatial, Tucker-2 or depthwise-separable), optionally activation-aware, and/or "
        "fold chains of linear ops. The result is compared with the original (cosine, SQNR "
        "per output) and written atomically; the input is never modified.",
        config=LowRankConfig,
        apply=lowrank.lowrank_apply,
        validate=lowrank.validate,
        from_cli=_lowrank_from_cli,
    )
)

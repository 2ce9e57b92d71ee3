"""File-level API: what the CLI commands call (load, rewrite, check, save atomically).

Each ``*_file`` function runs one registered transform (:mod:`onnxprune.registry`) through
the one file driver; they are re-exported at the top level (``onnxprune.prune_file``...).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from onnxprune.passes.pipeline import CanonicalizeConfig
from onnxprune.quant.fp16 import Fp16Config
from onnxprune.registry.driver import FileResult, run_file
from onnxprune.transforms import CANONICALIZE, FP16

__all__ = ["CanonicalizeResult", "canonicalize_file", "fp16_file"]

#: The report of :func:`canonicalize_file` (the driver's envelope).
CanonicalizeResult = FileResult

PathLike = str | os.PathLike[str]


def canonicalize_file(
    model_path: PathLike,
    output_path: PathLike,
    *,
    calib: PathLike | None = None,
    dims: Mapping[str, int] | None = None,
    skip: Sequence[str] = (),
    config: CanonicalizeConfig | None = None,
) -> FileResult:
    """Canonicalize ``model_path`` into ``output_path``; the input file is never modified.

    The rewritten model is checked against the original in onnxruntime (graph optimizations
    off) before it is published; a mismatch raises BudgetError and nothing is written.
    """
    config = config or CanonicalizeConfig(skip=tuple(skip))
    return run_file(CANONICALIZE, model_path, output_path, config, calib=calib, dims=dims)


def fp16_file(
    model_path: PathLike,
    output_path: PathLike,
    config: Fp16Config | None = None,
    *,
    calib: PathLike | None = None,
    eval_data: PathLike | None = None,
    dims: Mapping[str, int] | None = None,
) -> Any:
    """Convert ``model_path`` to float16 compute (float32 I/O) into ``output_path``."""
    return run_file(
        FP16, model_path, output_path, config, calib=calib, eval_data=eval_data, dims=dims
    )

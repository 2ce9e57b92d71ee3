"""Graph rewriting passes and the canonicalization pipeline that runs them.

Import order matters only in one direction: :mod:`~onnxprune.passes.pipeline` imports every
pass module, and no pass module imports this package's names (they import the submodules
they need, e.g. ``onnxprune.passes.base`` and ``onnxprune.passes._match``), so importing
the pipeline here creates no cycle.
"""

from onnxprune.passes.base import Change, Pass, PassReport, Skip
from onnxprune.passes.cleanup import (
    DeduplicateInitializersPass,
    RemoveDeadNodesPass,
    RemoveUnusedInitializersPass,
    TopologicalSortPass,
)
from onnxprune.passes.constant_folding import FoldConstantsPass
from onnxprune.passes.eliminate import EliminateNoOpsPass
from onnxprune.passes.fold_affine import FoldAffinePass
from onnxprune.passes.fold_batchnorm import FoldBatchNormPass
from onnxprune.passes.fold_pad import FoldPadPass
from onnxprune.passes.fuse_activations import FuseActivationsPass
from onnxprune.passes.pipeline import PASS_NAMES, CanonicalizeReport, canonicalize
from onnxprune.passes.reduce_mean_pool import ReduceMeanToPoolPass

__all__ = [
    "PASS_NAMES",
    "CanonicalizeReport",
    "Change",
    "DeduplicateInitializersPass",
    "EliminateNoOpsPass",
    "FoldAffinePass",
    "FoldBatchNormPass",
    "FoldConstantsPass",
    "FoldPadPass",
    "FuseActivationsPass",
    "Pass",
    "PassReport",
    "ReduceMeanToPoolPass",
    "RemoveDeadNodesPass",
    "RemoveUnusedInitializersPass",
    "Skip",
    "TopologicalSortPass",
    "canonicalize",
]

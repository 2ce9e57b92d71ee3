"""Recovery by distillation: the original model teaches the optimized one (issue 13).

Needs torch (``pip install onnxprune[recover]``). :class:`GraphReplay` runs an ONNX graph in
torch with chosen initializers as parameters; :func:`distill` trains those initializers so
the optimized model's outputs match the original's on unlabeled data. Only initializer values
change: graph structure, dtypes and shapes are untouched.
"""

from onnxprune.recover.distill import DistillOptions, DistillResult, distill
from onnxprune.recover.replay import GraphReplay, ReplayError, default_trainable

__all__ = [
    "DistillOptions",
    "DistillResult",
    "GraphReplay",
    "ReplayError",
    "default_trainable",
    "distill",
]

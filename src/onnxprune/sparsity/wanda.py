"""Importance scores: weight magnitude and Wanda (weight times input-activation norm).

For a weight view ``W[rows, K]`` (see :mod:`onnxprune.sparsity.layers`):

* magnitude: ``S[r, k] = |W[r, k]|``;
* Wanda (Sun et al., 2023, "A Simple and Effective Pruning Approach for LLMs"):
  ``S[r, k] = |W[r, k]| * ||X[:, k]||_2`` where ``X[n, K]`` stacks the layer's inputs on
  the calibration data. A weight fed by large activations matters more than its
  magnitude alone says. The paper compares scores within each output row.
"""

from __future__ import annotations

import numpy as np

__all__ = ["magnitude_scores", "wanda_scores"]


def magnitude_scores(matrix: np.ndarray) -> np.ndarray:
    """``|W|`` in float64."""
    return np.abs(matrix.astype(np.float64))


def wanda_scores(matrix: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """``|W[r, k]| * norms[k]`` in float64 (``norms[k] = ||X[:, k]||_2``)."""
    if norms.shape != (matrix.shape[1],):
        raise ValueError(f"norms shape {norms.shape} does not match K={matrix.shape[1]}")
    return magnitude_scores(matrix) * norms[None, :]

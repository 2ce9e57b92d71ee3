"""Closed-form refit of a group's consumers from input statistics (no pass over data).

The measured allocation cuts one group at a time and measures the output error. When the
cut will be followed by the least-squares refit (:mod:`onnxprune.prune.recover`), the error
that matters is the one left *after* the refit: groups whose removed channels the kept ones
predict well (correlated hidden units feeding a 1x1 projection) cost far less than the
zeroed probe says. This module gives the probe that refit without collecting rows.

For a consumer reading input channels ``x`` with weight columns ``W`` (``[channels,
outputs]``), removing the channels ``R`` and keeping ``K``, the least-squares correction of
the kept columns on centered inputs is

    dW_K = (C_KK + d I)^-1 C_KR W_R,        b' = b - mu_K dW_K

with ``C`` the input covariance, ``mu`` the input mean (the removed channels' mean
contribution ``mu_R W_R`` is already in the bias through the measured compensation) and
``d`` the damping of :data:`~onnxprune.prune.reconstruction.OBS_DAMPING`. It is exact (up to
``d``) for the consumers where the channel covariance is the whole story: a 1x1 Conv with
group 1, a Gemm, a MatMul with a constant 2-D weight. Other consumers are left as they are.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np
import onnx_ir as ir

from onnxprune.passes._match import const_numpy, name_of, required
from onnxprune.prune.analysis import Analysis, Group
from onnxprune.prune.channels import SpaceKey
from onnxprune.prune.compensate import InputMean, _add_to_bias, _bias_value
from onnxprune.prune.reconstruction import OBS_DAMPING, group_consumers

__all__ = ["refit_in_closed_form"]


def _exact(node: ir.Node) -> bool:
    """A consumer whose output is linear in its input channels through one weight column."""
    if node.op_type in ("Gemm", "MatMul"):
        return True
    weight = const_numpy(node.inputs[1])
    return node.op_type == "Conv" and all(k == 1 for k in weight.shape[2:])


def _write_columns(node: ir.Node, columns: np.ndarray) -> None:
    """Store ``columns`` (``[input channels, rest]``, Gemm alpha folded in) as the weight."""
    value = required(node.inputs[1])
    old = const_numpy(value)
    if node.op_type == "Conv":
        new = np.moveaxis(columns.reshape(old.shape[1], old.shape[0], *old.shape[2:]), 0, 1)
    elif node.op_type == "Gemm":
        alpha = node.attributes.get("alpha")
        new = columns / (1.0 if alpha is None else float(alpha.value))
        trans_b = node.attributes.get("transB")
        new = new.T if trans_b is not None and trans_b.value else new
    else:
        new = columns
    value.const_value = ir.tensor(np.ascontiguousarray(new).astype(old.dtype), name=value.name)


def refit_in_closed_form(
    model: ir.Model,
    analysis: Analysis,
    group: Group,
    removed_roots: Collection[int],
    *,
    covariances: Mapping[SpaceKey, np.ndarray],
    means: Mapping[str, InputMean],
) -> list[str]:
    """Refit, in place, the exact consumers of ``group`` for the removal of ``removed_roots``.

    Call on the model with the removed channels still present (before zeroing or slicing)
    and after the mean compensation. ``covariances`` maps a consumer input space to its
    channel covariance, ``means`` a consumer input name to its measured mean. Consumers
    without statistics, with a shared weight, not exact, or (MatMul) without a bias to take
    the mean shift are skipped. Returns the names
    of the refit consumers.
    """
    removed_units = {i for i, unit in enumerate(group.units) if unit.root in removed_roots}
    nodes = {node.name or name_of(node.outputs[0]): node for node in model.graph}
    done = []
    for consumer in group_consumers(model, analysis, group):
        node = nodes.get(consumer.node)
        cov = covariances.get(consumer.input)
        stats = means.get(consumer.input[0])
        if node is None or cov is None or stats is None or not _exact(node):
            continue
        if len(required(node.inputs[1]).uses()) > 1:
            continue
        if node.op_type == "MatMul" and _bias_value(node)[0] is None:
            continue  # no bias to take the mean shift
        w = consumer.weight
        r = np.array(sorted({c for u in removed_units for c in consumer.channels[u]}), int)
        k = np.setdiff1d(np.arange(len(w)), r)
        if not len(r) or not len(k) or cov.shape != (len(w), len(w)):
            continue
        damping = OBS_DAMPING * max(float(np.mean(np.diag(cov))), 1e-12)
        c_kk = cov[np.ix_(k, k)] + damping * np.eye(len(k))
        delta = np.linalg.solve(c_kk, cov[np.ix_(k, r)] @ w[r])
        columns = w.copy()
        columns[k] += delta
        _write_columns(node, columns)
        shift = -(stats.mean[k].astype(np.float64) @ delta)
        if np.any(shift):
            _add_to_bias(model, node, shift, None, zeroed=True)
        done.append(consumer.node)
    return done

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
group 1, a Gemm, a MatMul with a constant 2-D weight. For a ``k x k`` Conv with group 1 the
same solve runs over im2col patch columns (channel x tap; a removed channel removes all its
taps) with the patch covariance and mean of :func:`patch_statistics` (sampled positions, at
most :data:`MAX_PATCH_COLUMNS` columns); the bias also moves the removed taps' mean from the
channel mean the compensation used to the patch mean (exact without padding; with zero
padding the probe's border corrections make this an approximation). Other consumers are
left as they are. The damping is fixed: with few rows for many columns (a classifier after a
Flatten) the solve overfits, and the probe, scored on other feeds, shows that as error, while
the ridge refit that follows picks its strength by cross-validation and may do better: for
such groups the probe errs on the cautious side.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxprune.intermediates import iter_intermediates
from onnxprune.passes._match import const_numpy, name_of, required
from onnxprune.prune.analysis import Analysis, Group
from onnxprune.prune.channels import SpaceKey
from onnxprune.prune.compensate import InputMean, add_to_bias, bias_value
from onnxprune.prune.reconstruction import damped, group_consumers
from onnxprune.prune.recover import conv_output_shape, conv_rows, positions

__all__ = ["MAX_PATCH_COLUMNS", "PATCH_ROWS", "patch_statistics", "refit_in_closed_form"]

#: k x k Conv consumers with more im2col columns than this are not refit in closed form.
MAX_PATCH_COLUMNS = 2304
#: Sampled output positions per feed for the patch statistics.
PATCH_ROWS = 1024


def _exact(node: ir.Node) -> bool:
    """A consumer whose output is linear in its input channels through one weight column."""
    if node.op_type in ("Gemm", "MatMul"):
        return True
    shape = const_numpy(node.inputs[1]).shape
    return node.op_type == "Conv" and all(k == 1 for k in shape[2:])


def _spatial(node: ir.Node) -> bool:
    """A 2-D Conv with a kernel larger than 1x1."""
    shape = const_numpy(node.inputs[1]).shape
    return node.op_type == "Conv" and len(shape) == 4 and any(k > 1 for k in shape[2:])


def patch_statistics(
    model: ir.Model,
    analysis: Analysis,
    feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    rows: int = PATCH_ROWS,
    seed: int = 0,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Mean and covariance of the im2col patches of every ``k x k`` Conv consumer of a
    prunable group (node name -> (mean, covariance)), from ``rows`` sampled output
    positions per feed (seeded)."""
    convs: dict[str, ir.Node] = {}
    for group in analysis.prunable:
        for consumer in group_consumers(model, analysis, group):
            node = consumer.layer
            if node is None or not _spatial(node):
                continue
            weight = const_numpy(node.inputs[1])
            if int(np.prod(weight.shape[1:])) <= MAX_PATCH_COLUMNS:
                convs[consumer.node] = node
    if not convs:
        return {}
    rng = np.random.default_rng(seed)
    sums: dict[str, list] = {}
    names = sorted({name_of(n.inputs[0]) for n in convs.values()})
    for outputs in iter_intermediates(model, names, feeds):
        for key, node in sorted(convs.items()):
            x = outputs[name_of(node.inputs[0])].astype(np.float64)
            kernel = const_numpy(node.inputs[1]).shape[2:]
            shape = conv_output_shape(x.shape, node, kernel)
            patches = conv_rows(x, node, kernel, positions(shape, "conv", rows, rng))
            acc = sums.setdefault(key, [0.0, 0.0, 0])
            acc[0] = acc[0] + patches.T @ patches
            acc[1] = acc[1] + patches.sum(0)
            acc[2] += len(patches)
    result = {}
    for key, (gram, total, count) in sums.items():
        mean = total / max(count, 1)
        result[key] = (mean, gram / max(count, 1) - np.outer(mean, mean))
    return result


def _write_columns(node: ir.Node, columns: np.ndarray) -> None:
    """Store ``columns`` (``[input channels, rest]``, Gemm alpha folded in) as the weight."""
    old = const_numpy(node.inputs[1])
    if node.op_type == "Conv":
        new = np.moveaxis(columns.reshape(old.shape[1], old.shape[0], *old.shape[2:]), 0, 1)
    elif node.op_type == "Gemm":
        alpha = node.attributes.get("alpha")
        new = columns / (1.0 if alpha is None else float(alpha.value))
        trans_b = node.attributes.get("transB")
        new = new.T if trans_b is not None and trans_b.value else new
    else:
        new = columns
    _store(node, new)


def refit_in_closed_form(
    model: ir.Model,
    analysis: Analysis,
    group: Group,
    removed_roots: Collection[int],
    *,
    covariances: Mapping[SpaceKey, np.ndarray],
    means: Mapping[str, InputMean],
    patches: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> list[str]:
    """Refit, in place, the exact consumers of ``group`` for the removal of ``removed_roots``.

    Call on the model with the removed channels still present (before zeroing or slicing)
    and after the mean compensation. ``covariances`` maps a consumer input space to its
    channel covariance, ``means`` a consumer input name to its measured mean, ``patches``
    a ``k x k`` Conv consumer's name to its patch statistics (:func:`patch_statistics`). Consumers
    without statistics, with a shared weight, not exact, or (MatMul) without a bias to take
    the mean shift are skipped. Returns the names
    of the refit consumers.
    """
    removed_units = {i for i, unit in enumerate(group.units) if unit.root in removed_roots}
    done = []
    for consumer in group_consumers(model, analysis, group):
        node = consumer.layer
        if node is None or len(required(node.inputs[1]).uses()) > 1:
            continue
        if node.op_type == "MatMul" and bias_value(node)[0] is None:
            continue  # no bias to take the mean shift
        channels = sorted({c for u in removed_units for c in consumer.channels[u]})
        correction: np.ndarray | float = 0.0
        spatial = _spatial(node)
        if spatial:
            found = (patches or {}).get(consumer.node)
            if found is None:
                continue
            mean, cov = found
            weight = const_numpy(node.inputs[1]).astype(np.float64)
            taps = int(np.prod(weight.shape[2:]))
            w = weight.reshape(len(weight), -1).T  # [channel x tap, outputs]
            r = np.array([c * taps + t for c in channels for t in range(taps)], int)
            # the compensation added the channel means; the patches see their own means
            channel = means.get(consumer.input[0])
            if channel is not None and len(r):
                gap = mean[r] - np.repeat(channel.mean[channels].astype(np.float64), taps)
                correction = gap @ w[r]
        else:
            channel_cov = covariances.get(consumer.input)
            stats = means.get(consumer.input[0])
            if channel_cov is None or stats is None or not _exact(node):
                continue
            mean, cov = stats.mean, channel_cov
            w, r = consumer.weight, np.array(channels, int)
        k = np.setdiff1d(np.arange(len(w)), r)
        if not len(r) or not len(k) or cov.shape != (len(w), len(w)):
            continue
        delta = _least_squares(cov, w, k, r)
        columns = w.copy()
        columns[k] += delta
        if spatial:
            _store(node, columns.T.reshape(weight.shape))
        else:
            _write_columns(node, columns)
        shift = correction - mean[k].astype(np.float64) @ delta
        if np.any(shift):
            add_to_bias(model, node, shift, None, zeroed=True)
        done.append(consumer.node)
    return done


def _least_squares(cov: np.ndarray, w: np.ndarray, k: np.ndarray, r: np.ndarray) -> np.ndarray:
    """``(C_KK + d I)^-1 C_KR W_R``: the kept columns' correction for the removed ones."""
    return np.linalg.solve(damped(cov)[np.ix_(k, k)], cov[np.ix_(k, r)] @ w[r])


def _store(node: ir.Node, array: np.ndarray) -> None:
    value = required(node.inputs[1])
    dtype = const_numpy(value).dtype
    value.const_value = ir.tensor(np.ascontiguousarray(array).astype(dtype), name=value.name)

"""Reductions, shapes, indexing, constants, Cast and Pad."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (torch's own convention)

from onnxprune.recover.ops._base import (
    RULES,
    TORCH_DTYPES,
    Rule,
    Tensor,
    _axes,
    _ints,
    _rule,
    _torch_pad,
)

# ---------------------------------------------------------------- reductions


def _reduce(fn: Callable[[Tensor, list[int], bool], Tensor], axes_input_since: int) -> Rule:
    def run(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
        x = inputs[0]
        keep = bool(attrs.get("keepdims", 1))
        axes = _axes(attrs, inputs, 1) if opset >= axes_input_since else attrs.get("axes")
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return [x]
            axes = list(range(x.dim()))
        return [fn(x, [a % max(x.dim(), 1) for a in axes], keep)]

    return run


_REDUCERS: dict[str, Callable[[Tensor, list[int], bool], Tensor]] = {
    "ReduceMean": lambda x, d, k: x.mean(dim=d, keepdim=k),
    "ReduceSum": lambda x, d, k: x.sum(dim=d, keepdim=k),
    "ReduceMax": lambda x, d, k: x.amax(dim=d, keepdim=k),
    "ReduceMin": lambda x, d, k: x.amin(dim=d, keepdim=k),
    "ReduceProd": lambda x, d, k: _prod(x, d, k),  # noqa: PLW0108 (defined below)
    "ReduceL1": lambda x, d, k: x.abs().sum(dim=d, keepdim=k),
    "ReduceL2": lambda x, d, k: torch.sqrt((x * x).sum(dim=d, keepdim=k)),
    "ReduceSumSquare": lambda x, d, k: (x * x).sum(dim=d, keepdim=k),
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k),
}


def _prod(x: Tensor, dims: list[int], keep: bool) -> Tensor:
    for axis in sorted(dims, reverse=True):
        x = x.prod(dim=axis, keepdim=keep)
    return x


for _name, _red in _REDUCERS.items():
    RULES[_name] = _reduce(_red, 13 if _name == "ReduceSum" else 18)


def _arg(fn: Callable[..., Tensor]) -> Rule:
    def run(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
        x = inputs[0]
        axis = attrs.get("axis", 0) % x.dim()
        keep = bool(attrs.get("keepdims", 1))
        if attrs.get("select_last_index", 0):
            flipped = fn(x.flip(axis), dim=axis, keepdim=keep)
            return [x.shape[axis] - 1 - flipped]
        return [fn(x, dim=axis, keepdim=keep)]

    return run


RULES["ArgMax"] = _arg(torch.argmax)
RULES["ArgMin"] = _arg(torch.argmin)


@_rule("CumSum")
def _cumsum(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    x, axis = inputs[0], int(inputs[1].reshape(-1)[0]) % inputs[0].dim()
    if attrs.get("reverse", 0):
        x = x.flip(axis)
    y = torch.cumsum(x, dim=axis).to(x.dtype)
    if attrs.get("exclusive", 0):
        y = y - x
    return [y.flip(axis) if attrs.get("reverse", 0) else y]


# ---------------------------------------------------------------- shapes and indexing


@_rule("Shape")
def _shape(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    dims = list(inputs[0].shape)
    start, end = attrs.get("start", 0), attrs.get("end", len(dims))
    return [torch.tensor(dims[start:end], dtype=torch.int64)]


@_rule("Size")
def _size(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    return [torch.tensor(inputs[0].numel(), dtype=torch.int64)]


@_rule("Reshape")
def _reshape(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    x = inputs[0]
    shape = _ints(inputs[1]) if opset >= 5 else list(attrs["shape"])
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return [x.reshape(shape)]


@_rule("Flatten")
def _flatten(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    x = inputs[0]
    axis = attrs.get("axis", 1) % (x.dim() + 1) if x.dim() else 0
    return [x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))]


@_rule("Transpose")
def _transpose(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    x = inputs[0]
    perm = attrs.get("perm", list(reversed(range(x.dim()))))
    return [x.permute(*perm)]


@_rule("Squeeze")
def _squeeze(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    x = inputs[0]
    axes = _axes(attrs, inputs, 1)
    if axes is None:
        return [x.squeeze()]
    keep = [d for i, d in enumerate(x.shape) if i not in {a % x.dim() for a in axes}]
    return [x.reshape(keep)]


@_rule("Unsqueeze")
def _unsqueeze(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    x = inputs[0]
    axes = _axes(attrs, inputs, 1) or []
    rank = x.dim() + len(axes)
    for axis in sorted(a % rank for a in axes):
        x = x.unsqueeze(axis)
    return [x]


@_rule("Concat")
def _concat(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    return [torch.cat([t for t in inputs if t is not None], dim=attrs["axis"])]


@_rule("Split")
def _split(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    x = inputs[0]
    axis = attrs.get("axis", 0) % x.dim()
    if "split" in attrs:
        sizes = list(attrs["split"])
    elif len(inputs) > 1 and inputs[1] is not None:
        sizes = _ints(inputs[1])
    else:
        count = attrs.get("num_outputs", attrs.get("_outputs", 1))
        size = math.ceil(x.shape[axis] / count)
        sizes = [size] * (count - 1) + [x.shape[axis] - size * (count - 1)]
    return list(torch.split(x, sizes, dim=axis))


@_rule("Slice")
def _slice(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    x = inputs[0]
    if opset < 10:
        starts, ends = list(attrs["starts"]), list(attrs["ends"])
        axes = list(attrs.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = _ints(inputs[1]), _ints(inputs[2])
        has_axes = len(inputs) > 3 and inputs[3] is not None
        axes = _ints(inputs[3]) if has_axes else list(range(len(starts)))
        has_steps = len(inputs) > 4 and inputs[4] is not None
        steps = _ints(inputs[4]) if has_steps else [1] * len(starts)
    for start, end, raw_axis, step in zip(starts, ends, axes, steps, strict=True):
        axis = raw_axis % x.dim()
        indices = range(*slice(start, end, step).indices(x.shape[axis]))
        if step == 1:
            x = x.narrow(axis, indices.start, len(indices))
        else:
            x = x.index_select(axis, torch.tensor(list(indices), dtype=torch.int64))
    return [x]


@_rule("Gather")
def _gather(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    x, indices = inputs
    axis = attrs.get("axis", 0) % x.dim()
    indices = indices.long()
    indices = torch.where(indices < 0, indices + x.shape[axis], indices)
    picked = x.index_select(axis, indices.reshape(-1))
    shape = list(x.shape[:axis]) + list(indices.shape) + list(x.shape[axis + 1 :])
    return [picked.reshape(shape)]


@_rule("GatherElements")
def _gather_elements(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    x, indices = inputs
    axis = attrs.get("axis", 0) % x.dim()
    indices = indices.long()
    indices = torch.where(indices < 0, indices + x.shape[axis], indices)
    return [torch.gather(x, axis, indices)]


@_rule("GatherND")
def _gather_nd(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    x, indices = inputs[0], inputs[1].long()
    batch = attrs.get("batch_dims", 0)
    depth = indices.shape[-1]
    lead = list(x.shape[:batch])
    xs = x.reshape(math.prod(lead), *x.shape[batch:])
    idx = indices.reshape(math.prod(lead), -1, depth)
    rows = []
    for b in range(xs.shape[0]):
        sizes = torch.tensor(list(xs.shape[1 : 1 + depth]), dtype=torch.int64)
        ib = torch.where(idx[b] < 0, idx[b] + sizes, idx[b])
        rows.append(xs[b][tuple(ib.unbind(-1))])
    out = torch.stack(rows)
    return [out.reshape(*indices.shape[:-1], *x.shape[batch + depth :])]


@_rule("Expand")
def _expand(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    x = inputs[0]
    shape = torch.broadcast_shapes(tuple(x.shape), tuple(_ints(inputs[1])))
    return [x.expand(shape)]


@_rule("Tile")
def _tile(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    return [inputs[0].repeat(*_ints(inputs[1]))]


@_rule("ConstantOfShape")
def _constant_of_shape(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    value = attrs.get("value")
    fill = torch.zeros(1) if value is None else torch.from_numpy(np.array(value).reshape(1))
    return [fill.reshape([]).expand(_ints(inputs[0])).clone()]


@_rule("Range")
def _range(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    start, limit, delta = (t.reshape([]) for t in inputs)
    return [torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)]


@_rule("Constant")
def _constant(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    for key in ("value", "value_float", "value_int", "value_floats", "value_ints"):
        if key in attrs:
            array = np.array(attrs[key])
            if key in ("value_float", "value_floats"):
                array = array.astype(np.float32)
            elif key in ("value_int", "value_ints"):
                array = array.astype(np.int64)
            return [torch.from_numpy(np.array(array, copy=True))]
    raise NotImplementedError("Constant without a numeric value attribute")


@_rule("Cast")
def _cast(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    return [inputs[0].to(TORCH_DTYPES[attrs["to"]])]


@_rule("CastLike")
def _cast_like(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    return [inputs[0].to(inputs[1].dtype)]


@_rule("Dropout")
def _dropout(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    return [inputs[0], torch.ones_like(inputs[0], dtype=torch.bool)]


@_rule("Einsum")
def _einsum(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    return [torch.einsum(attrs["equation"], *inputs)]


@_rule("Pad")
def _pad(inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[Any]:
    x = inputs[0]
    if opset < 11:
        pads, value = list(attrs["pads"]), attrs.get("value", 0.0)
        axes = list(range(x.dim()))
    else:
        pads = _ints(inputs[1])
        value = inputs[2].reshape(-1)[0].item() if len(inputs) > 2 and inputs[2] is not None else 0
        has_axes = len(inputs) > 3 and inputs[3] is not None
        axes = [a % x.dim() for a in _ints(inputs[3])] if has_axes else list(range(x.dim()))
    full = [0] * (2 * x.dim())
    for i, axis in enumerate(axes):
        full[axis], full[axis + x.dim()] = pads[i], pads[i + len(axes)]
    mode = attrs.get("mode", "constant")
    if mode == "constant":
        return [F.pad(x, _torch_pad(full), value=value)]
    torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode]
    # torch pads up to the last three axes in these modes: fold the leading axes into one.
    rank = x.dim()
    padded = [a for a in range(rank) if full[a] or full[a + rank]]
    if not padded:
        return [x]
    first = padded[0]
    if rank - first > 3:
        raise NotImplementedError(f"Pad mode {mode} on more than the last three axes")
    lead, tail = list(x.shape[:first]), list(x.shape[first:])
    y = F.pad(
        x.reshape(1, -1, *tail),
        _torch_pad(full[first:rank] + full[rank + first :]),
        mode=torch_mode,
    )
    return [y.reshape(*lead, *y.shape[2:])]

"""Differentiable replay of an ONNX graph in torch, trainable initializers as parameters.

:class:`GraphReplay` executes the main graph node by node in its (topological) order, each
node through its rule in :mod:`onnxprune.recover.ops`. Chosen float initializers become
``torch.nn.Parameter``s; every other initializer, and every node whose inputs are all
constant, is a constant computed once. Integer weights read by a ``DequantizeLinear`` (a
QDQ int8 model) are trained as their dequantized float values and re-quantized on the way
forward with the node's own (fixed) scale and zero point, rounding straight-through, so the
written integers are exactly what the training forward saw.

Nodes without a rule (another domain, control flow, ops not covered) are **external**: their
outputs are computed by onnxruntime on the same feeds (the model with those values added as
outputs), as constants of the torch graph. No gradient can pass them, so every trainable
initializer upstream of one is frozen at its value, which keeps the onnxruntime values exact,
and the replay reports it in one line (:attr:`GraphReplay.frozen_note`).

Nothing about the graph is ever changed: :meth:`GraphReplay.export` writes the trained
values into a copy of the model's initializers (same names, dtypes and shapes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import torch

from onnxprune.errors import OnnxPruneError
from onnxprune.passes._match import name_of
from onnxprune.quant.vnni import limit_pairs, saturating_channels
from onnxprune.recover.ops import RULES, TORCH_DTYPES, fake_quantize, has_rule
from onnxprune.runtime import make_session

__all__ = ["GraphReplay", "ReplayError", "default_trainable"]

#: Input slots that hold weights, per op type (trained when they are float initializers).
WEIGHT_SLOTS: dict[str, tuple[int, ...]] = {
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "Gemm": (0, 1, 2),
    "MatMul": (0, 1),
    "BatchNormalization": (1, 2),
    "LayerNormalization": (1, 2),
    "InstanceNormalization": (1, 2),
    "PRelu": (1,),
    "QuantizeLinear": (0,),
    # Tables and stored values read by indexing: embeddings, and the non-zero values of
    # sparsify's bitmask storage (decoded in the graph by Gather/Where into the weight).
    "Gather": (0,),
    "Where": (1, 2),
}
#: Elementwise ops whose non-scalar float initializer operand is a bias or a scale.
_AFFINE = frozenset({"Add", "Sub", "Mul", "Div"})
_INTEGER_TYPES = frozenset({ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT16})


class ReplayError(OnnxPruneError):
    """A node's rule failed on its inputs (the message names the node and the op)."""

    def __init__(self, message: str, node: str) -> None:
        super().__init__(message)
        self.node = node


@dataclasses.dataclass
class _Step:
    name: str
    op_type: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any]


@dataclasses.dataclass
class _Dequant:
    """An integer weight trained as float: ``(q - zero) * scale``, re-quantized forward."""

    scale: torch.Tensor
    zero: torch.Tensor | None
    axis: int
    qtype: torch.dtype


def _attr_value(attr: ir.Attr) -> Any:
    value = attr.value
    if isinstance(value, ir.TensorProtocol):
        return np.array(value.numpy())
    if isinstance(value, tuple):
        return list(value)
    return value


def _is_initializer(graph: ir.Graph, value: ir.Value | None) -> bool:
    return value is not None and value.name in graph.initializers


def default_trainable(model: ir.Model) -> list[str]:
    """Float initializers in weight slots (:data:`WEIGHT_SLOTS`, non-scalar affine operands)
    and integer initializers dequantized by a ``DequantizeLinear`` with initializer scale."""
    graph = model.graph
    chosen: dict[str, None] = {}
    for node in graph:
        if node.domain not in ("", "ai.onnx"):
            continue
        for slot, value in enumerate(node.inputs):
            if not _is_initializer(graph, value):
                continue
            assert value is not None
            tensor = value.const_value
            if tensor is None:
                continue
            if node.op_type == "DequantizeLinear":
                if (
                    slot == 0
                    and tensor.dtype in _INTEGER_TYPES
                    and _is_initializer(graph, node.inputs[1])
                ):
                    chosen[name_of(value)] = None
                continue
            if tensor.dtype != ir.DataType.FLOAT:
                continue
            slots = WEIGHT_SLOTS.get(node.op_type, ())
            affine = node.op_type in _AFFINE and tensor.size > 1
            if (slot in slots and tensor.size > 1) or affine:
                chosen[name_of(value)] = None
    return list(chosen)


def _subgraph_inputs(node: ir.Node) -> list[str]:
    """Outer-scope values a node's subgraphs read (If/Loop/Scan bodies)."""
    names: list[str] = []
    for attr in node.attributes.values():
        graphs = []
        if attr.type == ir.AttributeType.GRAPH:
            graphs = [attr.value]
        elif attr.type == ir.AttributeType.GRAPHS:
            graphs = list(attr.value)
        for graph in graphs:
            local = {v.name for v in graph.inputs} | set(graph.initializers)
            for inner in ir.traversal.RecursiveGraphIterator(graph):
                local |= {v.name for v in inner.outputs if v is not None}
            for inner in ir.traversal.RecursiveGraphIterator(graph):
                names += [name_of(v) for v in inner.inputs if v is not None and v.name not in local]
    return names


class GraphReplay(torch.nn.Module):
    """The main graph of ``model`` as a torch module: ``replay(feeds) -> {output: tensor}``.

    Args:
        model: An ``onnx_ir`` model or a ModelProto (not modified).
        trainable: Initializer names to train (default :func:`default_trainable`).
        external: Further node names to run in onnxruntime instead of by their rule.
    """

    def __init__(
        self,
        model: ir.Model | onnx.ModelProto,
        *,
        trainable: Collection[str] | None = None,
        external: Collection[str] = (),
    ) -> None:
        super().__init__()
        if isinstance(model, onnx.ModelProto):
            model = ir.from_proto(model)
        self.model = model
        graph = model.graph
        self.opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        self.input_names = [name_of(v) for v in graph.inputs if v.name not in graph.initializers]
        self.output_names = [name_of(v) for v in graph.outputs]
        wanted = list(default_trainable(model) if trainable is None else trainable)
        missing = [n for n in wanted if n not in graph.initializers]
        if missing:
            raise OnnxPruneError(f"no initializer named {missing[0]!r} to train")
        steps, externals = self._steps(graph, set(external))
        frozen = self._frozen(graph, steps, externals, wanted)
        self.frozen = sorted(frozen)
        self.external_nodes = [(s.name, s.op_type) for s in steps if s.name in externals]
        self.trainable = [n for n in wanted if n not in frozen]
        self.params = torch.nn.ParameterDict()
        self._key: dict[str, str] = {}
        self._dequant: dict[str, _Dequant] = {}
        self._masks: dict[str, torch.Tensor] = {}
        #: int8 weights free of u8s8 pair saturation in the input: (axis, op type, dequant)
        self._pairs: dict[str, tuple[int, str, _Dequant]] = {}
        constants = self._constants(graph)
        for index, name in enumerate(self.trainable):
            key = f"p{index}"
            self._key[name] = key
            value = constants.pop(name)
            dequant = self._dequant_of(graph, name, constants)
            if dequant is not None:
                self._dequant[name] = dequant
                value = (
                    value.to(torch.float32)
                    - (
                        0.0
                        if dequant.zero is None
                        else _shape_like(dequant.zero, value, dequant.axis)
                    )
                ) * _shape_like(dequant.scale, value, dequant.axis)
            self.params[key] = torch.nn.Parameter(value.to(torch.float32).clone())
            # zeros of a weight are a sparsity mask; so is the zero of a 1-D table read by
            # Gather (sparsify's bitmask values: its last slot is what every removed weight
            # reads), while zeros of other 1-D tensors (biases) may be trained
            table = any(
                use.node.op_type == "Gather" and use.idx == 0
                for use in graph.initializers[name].uses()
            )
            if (value.dim() >= 2 or table) and bool((value == 0).any()):
                self._masks[key] = value != 0
            if dequant is not None:
                limit = _pair_limited(graph, name, dequant)
                if limit is not None:
                    self._pairs[key] = (*limit, dequant)
        self._steps_all = steps
        self._external = externals
        self._constants_env = self._fold(constants, steps, externals)
        self._session: Any = None
        self._segments: dict[tuple[tuple[str, ...], tuple[str, ...]], list[_Step]] = {}
        self._producers = {n: step for step in steps for n in step.outputs if n}

    # ------------------------------------------------------------------ construction

    @staticmethod
    def _steps(graph: ir.Graph, external: set[str]) -> tuple[list[_Step], set[str]]:
        steps, externals = [], set()
        for index, node in enumerate(graph):
            name = node.name or f"{node.op_type}_{index}"
            inputs = [name_of(v) if v is not None else "" for v in node.inputs]
            implicit = _subgraph_inputs(node)
            attrs = {k: _attr_value(a) for k, a in node.attributes.items() if not implicit}
            attrs["_outputs"] = len(node.outputs)
            step = _Step(
                name, node.op_type, inputs + implicit, [name_of(v) for v in node.outputs], attrs
            )
            if implicit or not has_rule(node.op_type, node.domain) or name in external:
                externals.add(name)
            steps.append(step)
        return steps, externals

    @staticmethod
    def _frozen(
        graph: ir.Graph, steps: list[_Step], externals: set[str], wanted: list[str]
    ) -> set[str]:
        """Trainable initializers upstream of an external node (no gradient passes it)."""
        # Only an external node that reaches a float graph output matters: an integer output
        # (a label after ArgMax) carries no gradient and is never a distillation target.
        live = {
            v.name
            for v in graph.outputs
            if v.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE)
        }
        live_steps = set()
        for step in reversed(steps):
            if any(n in live for n in step.outputs):
                live_steps.add(step.name)
                live |= set(step.inputs)
        upstream: dict[str, set[str]] = {n: {n} for n in wanted}
        frozen: set[str] = set()
        for step in steps:
            found: set[str] = set()
            for name in step.inputs:
                found |= upstream.get(name, set())
            if step.name in externals and step.name in live_steps:
                frozen |= found
            for name in step.outputs:
                upstream[name] = found
        return frozen

    @staticmethod
    def _constants(graph: ir.Graph) -> dict[str, torch.Tensor]:
        constants = {}
        for name, value in graph.initializers.items():
            if value.const_value is None:
                continue
            array = np.array(value.const_value.numpy())
            constants[name] = torch.from_numpy(array)
        return constants

    @staticmethod
    def _dequant_of(
        graph: ir.Graph, name: str, constants: Mapping[str, torch.Tensor]
    ) -> _Dequant | None:
        value = graph.initializers[name]
        for user, slot in value.uses():
            if user.op_type == "DequantizeLinear" and slot == 0:
                scale = constants[name_of(user.inputs[1])]
                zero_value = user.inputs[2] if len(user.inputs) > 2 else None
                zero = constants.get(name_of(zero_value)) if zero_value is not None else None
                axis = user.attributes.get_int("axis", 1)
                tensor = value.const_value
                assert tensor is not None, f"{name!r} is a trainable initializer"
                qtype = TORCH_DTYPES[int(tensor.dtype)]
                return _Dequant(scale, zero, axis, qtype)
        return None

    def _fold(
        self, constants: dict[str, torch.Tensor], steps: list[_Step], externals: set[str]
    ) -> dict[str, torch.Tensor]:
        """Constants, plus the outputs of every ruled node whose inputs are all constants."""
        env = dict(constants)
        self._dynamic: list[_Step] = []
        with torch.no_grad():
            for step in steps:
                const = step.name not in externals and all(not n or n in env for n in step.inputs)
                if const:
                    try:
                        outs = self._run_step(step, env)
                    except ReplayError:
                        const = False
                    else:
                        for name, out in zip(step.outputs, outs, strict=False):
                            if name and out is not None:
                                env[name] = out
                if not const:
                    self._dynamic.append(step)
        return env

    # ------------------------------------------------------------------ running

    def _run_step(self, step: _Step, env: Mapping[str, Any]) -> list[Any]:
        inputs = [env[n] if n else None for n in step.inputs]
        try:
            return RULES[step.op_type](inputs, step.attrs, self.opset)
        except Exception as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise ReplayError(
                f"node {step.name!r} ({step.op_type}) cannot be replayed: {reason}", step.name
            ) from None

    def parameter_value(self, name: str) -> torch.Tensor:
        """The value initializer ``name`` takes in the forward (re-quantized for int8)."""
        param = self.params[self._key[name]]
        dequant = self._dequant.get(name)
        if dequant is None:
            return param
        return fake_quantize(param, dequant.scale, dequant.zero, dequant.axis, dequant.qtype)

    def _external_values(self, feeds: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        names = [n for s in self._steps_all if s.name in self._external for n in s.outputs if n]
        if not names:
            return {}
        if self._session is None:
            proto = ir.to_proto(self.model)
            present = {o.name for o in proto.graph.output}
            for name in names:
                if name not in present:
                    proto.graph.output.append(onnx.ValueInfoProto(name=name))
            self._session = make_session(proto)
        arrays = self._session.run(names, {k: feeds[k] for k in self.input_names})
        return {n: torch.from_numpy(np.asarray(a)) for n, a in zip(names, arrays, strict=True)}

    def forward(
        self,
        feeds: Mapping[str, torch.Tensor | np.ndarray],
        outputs: Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Run the graph on ``feeds`` and return ``outputs`` (default: the graph's outputs)."""
        env: dict[str, Any] = dict(self._constants_env)
        for name in self._key:
            env[name] = self.parameter_value(name)
        arrays = {}
        for name in self.input_names:
            if name not in feeds:
                raise ReplayError(f"no feed for graph input {name!r}", name)
            feed = feeds[name]
            arrays[name] = feed.detach().numpy() if isinstance(feed, torch.Tensor) else feed
            env[name] = torch.as_tensor(feed)
        env.update(self._external_values(arrays))
        for step in self._dynamic:
            if step.name in self._external:
                continue
            for name, out in zip(step.outputs, self._run_step(step, env), strict=False):
                if name and out is not None:
                    env[name] = out
        return {n: env[n] for n in (outputs or self.output_names)}

    def forward_from(
        self, values: Mapping[str, torch.Tensor], outputs: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        """Run only the nodes between ``values`` (intermediate tensors given by name) and
        ``outputs``: a segment of the graph, for block-wise training.

        Raises:
            ReplayError: the segment needs a value not given (a graph input, a tensor from
                before the given ones) or a node run in onnxruntime.
        """
        plan = self.segment_plan(values, outputs)
        env: dict[str, Any] = dict(self._constants_env)
        for name in self._key:
            env[name] = self.parameter_value(name)
        env.update(values)
        for step in plan:
            for name, out in zip(step.outputs, self._run_step(step, env), strict=False):
                if name and out is not None:
                    env[name] = out
        return {n: env[n] for n in outputs}

    def segment_plan(self, given: Collection[str], outputs: Sequence[str]) -> list[_Step]:
        """The nodes :meth:`forward_from` runs from ``given`` to ``outputs`` (computed once
        per pair); raises :class:`ReplayError` as it does."""
        key = (tuple(sorted(given)), tuple(outputs))
        plan = self._segments.get(key)
        if plan is None:
            plan = self._segments[key] = self._segment(set(given), outputs)
        return plan

    def _segment(self, given: set[str], outputs: Sequence[str]) -> list[_Step]:
        known = set(self._constants_env) | set(self._key) | given
        needed = {n for n in outputs if n not in known}
        plan = []
        for step in reversed(self._dynamic):
            if not needed.intersection(step.outputs):
                continue
            if step.name in self._external:
                raise ReplayError(f"node {step.name!r} runs in onnxruntime", step.name)
            plan.append(step)
            needed -= set(step.outputs)
            needed |= {n for n in step.inputs if n and n not in known}
        if needed:
            first = sorted(needed)[0]
            raise ReplayError(f"the segment needs {first!r}, which is not given", first)
        return plan[::-1]

    # ------------------------------------------------------------------ masks and export

    def apply_masks(self) -> None:
        """Zero again every weight entry that was exactly zero (a sparsity mask), and bring
        int8 weights whose input had no u8s8-saturating pair back to none
        (:func:`onnxprune.quant.vnni.limit_pairs`: the quantizer's remedy for AVX2 without
        VNNI stays true after training)."""
        with torch.no_grad():
            for key, mask in self._masks.items():
                self.params[key].mul_(mask)
            for key, (axis, op_type, dequant) in self._pairs.items():
                param = self.params[key]
                scale = _shape_like(dequant.scale, param, dequant.axis)
                q = torch.clamp(torch.round(param / scale), -128, 127)
                limited = torch.from_numpy(
                    limit_pairs(q.numpy().astype(np.int64), axis, op_type).astype(np.float32)
                )
                changed = limited != q
                if bool(changed.any()):
                    param.copy_(torch.where(changed, limited * scale, param))

    def mask_gradients(self) -> None:
        for key, mask in self._masks.items():
            grad = self.params[key].grad
            if grad is not None:
                grad.mul_(mask)

    def state(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in self.params.items()}

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for key, value in state.items():
                self.params[key].copy_(value)

    def initializer_arrays(self) -> dict[str, np.ndarray]:
        """The trained initializers as arrays of their original dtype and shape."""
        result = {}
        with torch.no_grad():
            for name in self._key:
                tensor = self.parameter_value(name)
                original = self.model.graph.initializers[name].const_value
                assert original is not None
                dtype = original.dtype.numpy()
                result[name] = tensor.numpy().astype(dtype).reshape(original.shape.numpy())
        return result

    def export(self) -> ir.Model:
        """A copy of the model with the trained initializer values (graph unchanged)."""
        copy = ir.from_proto(ir.to_proto(self.model))
        for name, array in self.initializer_arrays().items():
            value = copy.graph.initializers[name]
            value.const_value = ir.Tensor(array, name=name)
        return copy

    @property
    def frozen_note(self) -> str | None:
        """One line naming the nodes without a rule and what they freeze, or None."""
        if not self.external_nodes:
            return None
        shown = ", ".join(f"{n} ({op})" for n, op in self.external_nodes[:4])
        more = len(self.external_nodes) - 4
        extra = f" and {more} more" if more > 0 else ""
        return (
            f"no replay rule for {shown}{extra}: run in onnxruntime as constants; "
            f"{len(self.frozen)} weight(s) upstream of them frozen"
        )


def _pair_limited(graph: ir.Graph, name: str, dequant: _Dequant) -> tuple[int, str] | None:
    """(output-channel axis, op type) of an int8 Conv/Gemm/MatMul weight with no adjacent K
    pair summing past 128 (a model quantized for AVX2 without VNNI), else None."""
    if dequant.qtype != torch.int8 or (dequant.zero is not None and bool(dequant.zero.any())):
        return None
    value = graph.initializers[name]
    dq = next(u.node for u in value.uses() if u.node.op_type == "DequantizeLinear")
    uses = list(dq.outputs[0].uses())
    if len(uses) != 1 or uses[0].idx != 1 or uses[0].node.op_type not in ("Conv", "Gemm", "MatMul"):
        return None
    layer = uses[0].node
    tensor = value.const_value
    assert tensor is not None
    q = np.asarray(tensor.numpy())
    if layer.op_type == "Conv":
        axis = 0
    elif layer.op_type == "Gemm":
        axis = 0 if layer.attributes.get_int("transB", 0) else 1
    else:
        axis = q.ndim - 1
    if q.ndim < 2 or saturating_channels(q, axis, layer.op_type).any():
        return None
    return axis, layer.op_type


def _shape_like(t: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    if t.dim() == 0 or t.numel() == 1:
        return t.reshape([]).to(torch.float32)
    shape = [1] * x.dim()
    shape[axis % x.dim()] = -1
    return t.reshape(shape).to(torch.float32)

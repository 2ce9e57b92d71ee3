"""Property test: on random small graphs, pruning zeroed channels changes nothing and is stable.

Graphs are drawn from the supported op vocabulary: Conv (random kernel, pads, stride, bias),
depthwise Conv with a channel multiplier, Relu/Clip/Sigmoid, BatchNormalization, residual
Add, channel Concat of two branches, then either a 1x1 Conv output or a GlobalAveragePool +
Flatten + Gemm head followed by MatMul/Add/Gelu MLP blocks. For each graph and a random
ratio and ``round_to``:

(a) the pruned model passes ``onnx.checker`` with ``full_check``;
(b) the model with the chosen units zeroed and the pruned model agree within 1e-5
    (onnxruntime with graph optimizations off), and at least one case really removes units;
(c) analysing and pruning the pruned model again at ratio 0 changes nothing (byte-equal).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxprune.prune import PruneOptions, analyze, decide_plan, prune_model, zero_units
from onnxprune.runtime import run_model

_CHANNELS = st.sampled_from([2, 3, 4, 6, 8, 12, 16])
_CONV = st.tuples(
    st.just("conv"), _CHANNELS, st.sampled_from([1, 3]), st.sampled_from([1, 2]), st.booleans()
)
_BLOCK = st.one_of(
    _CONV,
    st.tuples(st.just("depthwise"), st.sampled_from([1, 2]), st.sampled_from([1, 3])),
    st.tuples(st.just("act"), st.sampled_from(["Relu", "Clip", "Sigmoid"])),
    st.tuples(st.just("bn")),
    st.tuples(st.just("residual"), st.sampled_from(["Relu", "Sigmoid"])),
    st.tuples(st.just("concat"), _CHANNELS, _CHANNELS),
)
_HEAD = st.one_of(
    st.tuples(st.just("conv_out")),
    st.tuples(st.just("mlp"), st.lists(st.sampled_from([4, 8, 12, 24]), max_size=2)),
)


class _Graph:
    """Accumulates nodes and initializers; the current tensor has ``c`` channels, side ``h``."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.cur, self.c, self.h = "x", 3, 8
        self.count = 0

    def name(self, stem: str) -> str:
        self.count += 1
        return f"{stem}{self.count}"

    def init(self, stem: str, array: np.ndarray) -> str:
        name = self.name(stem)
        self.inits.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    def node(self, op: str, inputs: list[str], **attrs: object) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def weight(self, *shape: int) -> str:
        fan_in = int(np.prod(shape[1:]))
        return self.init("w", self.rng.standard_normal(shape) / np.sqrt(fan_in))

    def conv(
        self, src: str, c_in: int, c_out: int, k: int, stride: int = 1, *, bias: bool, same: bool
    ) -> str:
        """A Conv; ``same`` keeps the side (pads k//2, stride 1), else pads are random."""
        pad = k // 2 if same or self.rng.random() < 0.7 else 0
        stride = 1 if same else stride
        if (self.h + 2 * pad - k) // stride + 1 < 1:
            stride, pad = 1, k // 2
        inputs = [src, self.weight(c_out, c_in, k, k)]
        if bias:
            inputs.append(self.init("b", self.rng.standard_normal(c_out) * 0.1))
        out = self.node("Conv", inputs, pads=[pad] * 4, strides=[stride] * 2)
        self.h = (self.h + 2 * pad - k) // stride + 1
        return out

    def act(self, src: str, kind: str) -> str:
        if kind == "Clip":
            lo = self.init("lo", np.array(0.0))
            hi = self.init("hi", np.array(6.0))
            return self.node("Clip", [src, lo, hi])
        return self.node(kind, [src])

    def block(self, spec: tuple) -> None:
        kind = spec[0]
        if kind == "conv":
            _, c_out, k, stride, bias = spec
            stride = stride if self.h >= 4 else 1
            self.cur = self.conv(self.cur, self.c, c_out, k, stride, bias=bias, same=False)
            self.c = c_out
        elif kind == "depthwise":
            _, mult, k = spec
            w = self.weight(self.c * mult, 1, k, k)
            self.cur = self.node("Conv", [self.cur, w], group=self.c, pads=[k // 2] * 4)
            self.c *= mult
        elif kind == "act":
            self.cur = self.act(self.cur, spec[1])
        elif kind == "bn":
            params = [
                self.rng.uniform(0.5, 1.5, self.c),
                self.rng.standard_normal(self.c) * 0.1,
                self.rng.standard_normal(self.c) * 0.1,
                self.rng.uniform(0.5, 1.5, self.c),
            ]
            names = [self.init(s, p) for s, p in zip(("g", "be", "m", "v"), params, strict=True)]
            self.cur = self.node("BatchNormalization", [self.cur, *names])
        elif kind == "residual":
            branch = self.conv(self.cur, self.c, self.c, 3, bias=True, same=True)
            branch = self.conv(self.act(branch, spec[1]), self.c, self.c, 1, bias=False, same=True)
            self.cur = self.node("Add", [self.cur, branch])
        else:  # concat of two branches
            a = self.conv(self.cur, self.c, spec[1], 1, bias=True, same=True)
            b = self.conv(self.cur, self.c, spec[2], 3, bias=False, same=True)
            self.cur = self.node("Concat", [a, b], axis=1)
            self.c = spec[1] + spec[2]

    def head(self, spec: tuple) -> tuple[str, list[int]]:
        if spec[0] == "conv_out":
            self.cur = self.node("Conv", [self.cur, self.weight(3, self.c, 1, 1)])
            return self.cur, [1, 3, self.h, self.h]
        pooled = self.node("Flatten", [self.node("GlobalAveragePool", [self.cur])])
        width = spec[1][0] if spec[1] else 5
        wg = self.weight(width, self.c)
        hidden = self.node("Gemm", [pooled, wg, self.init("b", np.zeros(width))], transB=1)
        for size in spec[1][1:]:
            mm = self.node(
                "MatMul",
                [hidden, self.init("w", self.rng.standard_normal((width, size)) / np.sqrt(width))],
            )
            biased = self.node("Add", [mm, self.init("b", self.rng.standard_normal(size) * 0.1)])
            hidden, width = self.node("Gelu", [biased]), size
        out = self.node("Gemm", [hidden, self.weight(5, width)], transB=1)
        return out, [1, 5]


def _build(blocks: list[tuple], head: tuple, seed: int) -> ir.Model:
    graph = _Graph(seed)
    graph.cur = graph.conv("x", 3, 8, 3, bias=True, same=True)
    graph.c = 8  # stem: the graph input's channels are never pruned
    for spec in blocks:
        graph.block(spec)
    out, shape = graph.head(head)
    proto = helper.make_model(
        helper.make_graph(
            graph.nodes,
            "random",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, shape)],
            graph.inits,
        ),
        opset_imports=[helper.make_opsetid("", 20)],
        ir_version=10,
    )
    onnx.checker.check_model(proto, full_check=True)
    return ir.serde.deserialize_model(proto)


def _copy(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


_REMOVED_SOMETHING: list[bool] = []


@settings(
    derandomize=True,
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    blocks=st.lists(_BLOCK, min_size=1, max_size=6),
    head=_HEAD,
    seed=st.integers(0, 2**16),
    ratio=st.sampled_from([0.2, 0.3, 0.5, 0.7]),
    round_to=st.sampled_from([1, 2, 4, 8]),
)
def test_pruning_zeroed_units_is_exact_and_idempotent(blocks, head, seed, ratio, round_to):
    model = _build(blocks, head, seed)
    analysis = analyze(model)
    plan, _ = decide_plan(model, analysis, PruneOptions(ratio=ratio, round_to=round_to))
    zeroed = _copy(model)
    zero_units(zeroed, analyze(zeroed), plan.removed_roots(analyze(zeroed)))
    pruned = _copy(zeroed)
    prune_model(pruned, PruneOptions(plan=plan))
    _REMOVED_SOMETHING.append(bool(plan.keep))

    proto = ir.serde.serialize_model(pruned)
    onnx.checker.check_model(proto, full_check=True)  # (a)

    feeds = {"x": np.random.default_rng(seed).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    ref, got = run_model(zeroed, feeds), run_model(pruned, feeds)  # (b)
    for key, value in ref.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-5, err_msg=key)

    again = _copy(pruned)  # (c)
    report = prune_model(again, PruneOptions(ratio=0.0))
    assert not report.plan.keep and report.macs[0] == report.macs[1]
    assert ir.serde.serialize_model(again).SerializeToString() == proto.SerializeToString()


def test_the_property_really_pruned():
    """Guard against a generator whose graphs never prune (the property would be vacuous)."""
    if not _REMOVED_SOMETHING:
        test_pruning_zeroed_units_is_exact_and_idempotent()
    assert sum(_REMOVED_SOMETHING) >= len(_REMOVED_SOMETHING) // 2

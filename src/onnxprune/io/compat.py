"""Can the installed onnxruntime run this model's IR version and opsets?

Asked of onnxruntime itself rather than of a version table: a one-node probe model with the
model's IR version and opset imports is given to ``InferenceSession``. The answer is cached
per (ir_version, opsets).
"""

from __future__ import annotations

import functools

import onnx
import onnxruntime as ort

from onnxprune.errors import ModelLoadError

__all__ = ["check_runtime_support"]

_PROBED_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")


@functools.lru_cache(maxsize=64)
def _probe(ir_version: int, opsets: tuple[tuple[str, int], ...]) -> str | None:
    """None when onnxruntime accepts a model with these versions, else its error message."""
    value_in = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    value_out = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    graph = onnx.helper.make_graph([node], "probe", [value_in], [value_out])
    model = onnx.helper.make_model(
        graph,
        opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in opsets],
        ir_version=ir_version,
    )
    from onnxprune.runtime import make_session  # runtime imports io: not at module level

    try:
        make_session(model, log_severity=4)
    except Exception as exc:  # onnxruntime raises several unrelated exception types
        return str(exc).strip().splitlines()[0]
    return None


def check_runtime_support(model: onnx.ModelProto, source: str) -> None:
    """Raise ModelLoadError when onnxruntime cannot run this IR version or opset."""
    opsets = {imp.domain: imp.version for imp in model.opset_import}
    default = opsets.get("", opsets.get("ai.onnx"))
    if default is None:
        raise ModelLoadError(f"{source}: model imports no default-domain (ai.onnx) opset")
    probed = tuple(sorted((d or "", v) for d, v in opsets.items() if d in _PROBED_DOMAINS))
    error = _probe(model.ir_version, probed)
    if error is not None:
        raise ModelLoadError(
            f"{source}: onnxruntime {ort.__version__} cannot run IR version {model.ir_version} "
            f"with opsets {dict(probed)}: {error}"
        )

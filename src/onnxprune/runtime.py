"""The one place that builds onnxruntime sessions.

Providers are matched case-insensitively by short name ("cpu", "cuda", "tensorrt") or full
name; a missing provider is an error that lists the available ones. Thread counts are set
explicitly so measurements are reproducible.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxprune.errors import UsageError
from onnxprune.io.pinned import inline_proto, refuse_external

__all__ = ["PROVIDER_ALIASES", "make_session", "resolve_provider", "run_model"]

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}


def resolve_provider(name: str) -> str:
    """Map ``cpu``/``cuda``/``tensorrt`` (any case) or a full provider name to an available one."""
    available = ort.get_available_providers()
    wanted = PROVIDER_ALIASES.get(name.lower(), name)
    for provider in available:
        if provider.lower() == wanted.lower():
            return provider
    raise UsageError(
        f"execution provider {name!r} is not available in this onnxruntime "
        f"({ort.__version__}); available: {', '.join(available)}"
    )


def make_session(
    model: ir.Model | onnx.ModelProto | str | os.PathLike[str],
    *,
    provider: str = "cpu",
    provider_options: Mapping[str, Any] | None = None,
    optimize: bool = False,
    intra_op_threads: int = 1,
    inter_op_threads: int = 1,
    optimized_model_path: str | None = None,
    log_severity: int = 3,
) -> ort.InferenceSession:
    """Create an InferenceSession.

    Args:
        model: An IR model, a ModelProto, or a path. An IR model's external tensors are
            read through their validated files (inlined, or saved to a temporary folder
            when too large for one proto); a ModelProto must hold all its data inline,
            since onnxruntime would resolve external data against the current folder.
        provider: Execution provider short name or full name.
        provider_options: Options for that provider.
        optimize: Enable onnxruntime's graph optimizations. Tests compare numerics with them
            off, so ORT's own fusions cannot hide a bug in ours.
        intra_op_threads: Threads per operator (0 lets onnxruntime choose).
        inter_op_threads: Threads across operators.
        optimized_model_path: Where ORT writes the graph it actually runs.
        log_severity: onnxruntime's log level (3: errors; 4: fatal only, for probes whose
            failure is the answer).
    """
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = inter_op_threads
    opts.log_severity_level = log_severity
    if optimized_model_path is not None:
        opts.optimized_model_filepath = str(optimized_model_path)
    resolved = resolve_provider(provider)
    providers: list[Any] = [(resolved, dict(provider_options or {}))]
    if resolved != "CPUExecutionProvider":
        providers.append("CPUExecutionProvider")
    with _runtime_source(model) as source:
        return ort.InferenceSession(source, sess_options=opts, providers=providers)


#: In-memory models with more tensor data than this are handed over as a saved file.
_INLINE_LIMIT = 1 << 30


def _initializer_bytes(model: ir.Model) -> int:
    values = (v for g in model.graphs() for v in g.initializers.values())
    return sum(v.const_value.nbytes for v in values if v.const_value is not None)


@contextlib.contextmanager
def _runtime_source(model: ir.Model | onnx.ModelProto | str | os.PathLike[str]) -> Iterator[Any]:
    """What onnxruntime is given: bytes with every tensor inline, or a path."""
    if isinstance(model, onnx.ModelProto):
        refuse_external(model)
        yield model.SerializeToString()
    elif not isinstance(model, ir.Model):
        yield str(model)
    elif _initializer_bytes(model) <= _INLINE_LIMIT:
        yield inline_proto(model).SerializeToString()
    else:
        from onnxprune.io.save import save

        with tempfile.TemporaryDirectory(prefix="onnxprune-session-") as folder:
            yield str(save(model, Path(folder) / "model.onnx", external_data=True))


def run_model(
    model: ir.Model | onnx.ModelProto | str | os.PathLike[str],
    feeds: Mapping[str, np.ndarray],
    *,
    output_names: Sequence[str] | None = None,
    optimize: bool = False,
) -> dict[str, np.ndarray]:
    """Run ``model`` once on CPU and return its outputs by name."""
    session = make_session(model, optimize=optimize)
    names = list(output_names) if output_names else [o.name for o in session.get_outputs()]
    results = session.run(names, dict(feeds))
    return dict(zip(names, results, strict=True))

"""Export the reference models to ONNX with both torch exporters and check them in onnxruntime.

Usage::

    python models/export.py --out DIR [--models resnet18,resnet50,...] \
        [--exporter torchscript|dynamo|both] [--no-verify]

Files are named ``<model>.<exporter>.onnx`` (e.g. ``resnet50.dynamo.onnx``). The batch axis
is dynamic (``batch``), and so is the sequence axis of token inputs (``seq``). Every
file is self-contained (no external data).

The two exporters give deliberately different graphs:

* ``torchscript`` (``dynamo=False``): opset 17, constant folding on, and BatchNorm *kept*
  as BatchNormalization nodes (``training=TrainingMode.PRESERVE`` on an eval-mode module),
  so onnxprune's BN folding has Conv -> BN pairs to work on.
* ``dynamo`` (``dynamo=True``): torch's defaults, i.e. its default opset (20 with torch
  2.13) and the onnxscript optimizer, which already folds BatchNorm into the convolutions.

After export each model is run in onnxruntime with graph optimizations disabled, on a batch
size (and sequence length) different from the one used for tracing, and compared with
torch (``--atol``, default 1e-4).

The importable API is :func:`export_model` (build + export + save) and
:func:`verify_export` (onnxruntime vs torch).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

# This file is run as a script and also loaded by path (tests, onnxprune.models_cache), so
# make its sibling importable either way.
_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

import architectures  # noqa: E402

__all__ = [
    "EXPORTERS",
    "MODEL_SPECS",
    "TORCHSCRIPT_OPSET",
    "InputSpec",
    "ModelSpec",
    "example_inputs",
    "export_model",
    "export_module",
    "main",
    "verify_export",
]

logger = logging.getLogger("onnxprune.models.export")

EXPORTERS = ("torchscript", "dynamo")
TORCHSCRIPT_OPSET = 17


@dataclass(frozen=True)
class InputSpec:
    """One model input: name, shape with ``None`` on the dynamic axes, and its kind.

    ``vocab`` > 0 marks an int64 token input with values in ``[0, vocab)``; ``mask`` marks
    an int64 0/1 attention mask (trailing positions of later rows are padding).
    """

    name: str
    shape: tuple[int | str, ...]
    vocab: int = 0
    mask: bool = False


@dataclass(frozen=True)
class ModelSpec:
    """How to build, feed and name one reference model."""

    build: Callable[[], nn.Module]
    inputs: tuple[InputSpec, ...]
    outputs: tuple[str, ...]
    description: str = ""
    dynamic_dims: tuple[str, ...] = field(default=("batch",))


_IMAGE_224 = (InputSpec("input", ("batch", 3, 224, 224)),)

MODEL_SPECS: dict[str, ModelSpec] = {
    "resnet18": ModelSpec(
        architectures.build_resnet18, _IMAGE_224, ("logits",), "ResNet-18, ImageNet"
    ),
    "resnet50": ModelSpec(
        architectures.build_resnet50, _IMAGE_224, ("logits",), "ResNet-50 v1.5, ImageNet"
    ),
    "mobilenet_v2": ModelSpec(
        architectures.build_mobilenet_v2, _IMAGE_224, ("logits",), "MobileNetV2 1.0, ImageNet"
    ),
    "densenet121": ModelSpec(
        architectures.build_densenet121,
        _IMAGE_224,
        ("logits",),
        "DenseNet-121, ImageNet: dense blocks of Concat",
    ),
    "detector": ModelSpec(
        architectures.build_detector,
        (InputSpec("input", ("batch", 3, 128, 128)),),
        ("p3", "p4", "p5"),
        "YOLO-style detector: Split/Concat, nearest Resize, 3 heads",
    ),
    "encoder": ModelSpec(
        architectures.build_encoder,
        (
            InputSpec("input_ids", ("batch", "seq"), vocab=30522),
            InputSpec("attention_mask", ("batch", "seq"), mask=True),
        ),
        ("last_hidden_state", "pooler_output"),
        "BERT-style encoder, 6 layers, hidden 384, 12 heads",
        ("batch", "seq"),
    ),
    "mlp": ModelSpec(
        architectures.build_mlp,
        (InputSpec("input", ("batch", 64)),),
        ("logits",),
        "MLP 64-256-128-10",
    ),
    "fusion": ModelSpec(
        architectures.build_fusion,
        (
            InputSpec("image", ("batch", 3, 32, 32)),
            InputSpec("tokens", ("batch", "seq"), vocab=1000),
        ),
        ("logits",),
        "image CNN + token embedding, concatenated into an MLP head",
        ("batch", "seq"),
    ),
}


def example_inputs(
    spec: ModelSpec, batch: int = 2, seq: int = 16, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """Seeded inputs for ``spec``: N(0,1) floats, token ids, or a right-padded 0/1 mask."""
    gen = torch.Generator().manual_seed(seed)
    sizes = {"batch": batch, "seq": seq}
    tensors: list[torch.Tensor] = []
    for inp in spec.inputs:
        shape = tuple(sizes[d] if isinstance(d, str) else d for d in inp.shape)
        if inp.vocab:
            tensors.append(torch.randint(0, inp.vocab, shape, generator=gen))
        elif inp.mask:
            mask = torch.ones(shape, dtype=torch.int64)
            for row in range(1, shape[0]):  # row i has i * seq // (2 * batch) padded tokens
                pad = row * shape[1] // (2 * shape[0])
                if pad:
                    mask[row, -pad:] = 0
            tensors.append(mask)
        else:
            tensors.append(torch.randn(shape, generator=gen))
    return tuple(tensors)


def _dynamic_axes(spec: ModelSpec) -> dict[str, dict[int, str]]:
    axes = {
        inp.name: {i: d for i, d in enumerate(inp.shape) if isinstance(d, str)}
        for inp in spec.inputs
    }
    # Every output carries the batch axis first; the encoder's hidden state also the sequence.
    for out in spec.outputs:
        axes[out] = {0: "batch"}
    if "last_hidden_state" in spec.outputs:
        axes["last_hidden_state"] = {0: "batch", 1: "seq"}
    return axes


def _export_torchscript(
    module: nn.Module, spec: ModelSpec, args: tuple[torch.Tensor, ...], path: Path
) -> None:
    with warnings.catch_warnings():
        # The advice to disable constant folding targets modules in *training* mode.
        warnings.filterwarnings("ignore", message="It is recommended that constant folding")
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            opset_version=TORCHSCRIPT_OPSET,
            input_names=[inp.name for inp in spec.inputs],
            output_names=list(spec.outputs),
            dynamic_axes=_dynamic_axes(spec),
            do_constant_folding=True,
            # EVAL would fold every BatchNorm into its Conv; PRESERVE on a module in eval
            # mode exports inference-mode BatchNormalization nodes instead, so the graph
            # keeps Conv -> BN pairs for onnxprune's own folding to work on.
            training=torch.onnx.TrainingMode.PRESERVE,
        )


def _export_dynamo(
    module: nn.Module, spec: ModelSpec, args: tuple[torch.Tensor, ...], path: Path
) -> None:
    # ``seq`` is bounded by the encoder's 512 position embeddings.
    dims = {
        name: torch.export.Dim(name, min=1, max=512 if name == "seq" else 65536)
        for name in spec.dynamic_dims
    }
    dynamic_shapes = tuple(
        {i: dims[d] for i, d in enumerate(inp.shape) if isinstance(d, str)} for inp in spec.inputs
    )
    with warnings.catch_warnings():
        # Dims that share constraints are renamed by torch; _name_dynamic_dims fixes names.
        warnings.filterwarnings("ignore", message="# The axis name")
        program = _dynamo_export(module, spec, args, dynamic_shapes)
    if program is None:  # pragma: no cover - only when ``f`` is given
        raise RuntimeError("the dynamo exporter returned no program")
    # One self-contained file: the reference models are far below the 2 GB protobuf limit.
    program.save(str(path), external_data=False)
    _name_dynamic_dims(path, spec)


def _dynamo_export(
    module: nn.Module,
    spec: ModelSpec,
    args: tuple[torch.Tensor, ...],
    dynamic_shapes: tuple[dict[int, torch.export.Dim], ...],
) -> torch.onnx.ONNXProgram | None:
    return torch.onnx.export(
        module,
        args,
        dynamo=True,
        input_names=[inp.name for inp in spec.inputs],
        output_names=list(spec.outputs),
        dynamic_shapes=dynamic_shapes,
        verbose=False,
    )


def _name_dynamic_dims(path: Path, spec: ModelSpec) -> None:
    """Give graph inputs/outputs the same dim names as the TorchScript export (``batch``...)."""
    model = onnx.load(str(path))
    wanted = _dynamic_axes(spec)
    changed = False
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        for axis, name in wanted.get(value.name, {}).items():
            if axis < len(dims) and dims[axis].dim_param != name:
                dims[axis].dim_param = name
                changed = True
    if changed:
        onnx.save(model, str(path))


def export_module(module: nn.Module, spec: ModelSpec, exporter: str, path: Path) -> Path:
    """Export an already built ``module`` described by ``spec`` to ``path``."""
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; choose from {', '.join(EXPORTERS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    args = example_inputs(spec)
    if exporter == "torchscript":
        _export_torchscript(module, spec, args, path)
    else:
        _export_dynamo(module, spec, args, path)
    return path


def export_model(name: str, exporter: str, out_dir: str | Path) -> Path:
    """Build reference model ``name`` and export it to ``out_dir/<name>.<exporter>.onnx``."""
    if name not in MODEL_SPECS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODEL_SPECS)}")
    spec = MODEL_SPECS[name]
    path = Path(out_dir) / f"{name}.{exporter}.onnx"
    start = time.perf_counter_ns()
    export_module(spec.build(), spec, exporter, path)
    seconds = (time.perf_counter_ns() - start) / 1e9
    logger.info("exported %s with %s to %s in %.1f s", name, exporter, path, seconds)
    return path


def verify_export(
    path: str | Path, module: nn.Module, spec: ModelSpec, *, batch: int = 3, seq: int = 24
) -> float:
    """Check ``path`` with onnx.checker, run it in onnxruntime (optimizations disabled) and
    return the largest absolute difference to torch over all outputs.

    ``batch``/``seq`` should differ from the export-time sizes (2/16) so that the dynamic
    axes are exercised.
    """
    onnx.checker.check_model(str(path), full_check=True)
    args = example_inputs(spec, batch=batch, seq=seq, seed=1)
    with torch.no_grad():
        expected = module(*args)
    expected_list = list(expected) if isinstance(expected, tuple) else [expected]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {inp.name: t.numpy() for inp, t in zip(spec.inputs, args, strict=True)}
    actual = session.run(list(spec.outputs), feeds)
    worst = 0.0
    for want, got in zip(expected_list, actual, strict=True):
        if tuple(want.shape) != got.shape:
            raise AssertionError(f"{path}: output shape {got.shape} != torch {tuple(want.shape)}")
        worst = max(worst, float(np.max(np.abs(want.numpy() - got))))
    return worst


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (1 when a model does not match torch)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--models",
        default=",".join(MODEL_SPECS),
        help=f"comma-separated subset of: {', '.join(MODEL_SPECS)}",
    )
    parser.add_argument("--exporter", choices=[*EXPORTERS, "both"], default="both")
    parser.add_argument("--atol", type=float, default=1e-4, help="max abs diff vs torch")
    parser.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = sorted(set(names) - set(MODEL_SPECS))
    if unknown:
        parser.error(f"unknown models: {', '.join(unknown)}; choose from {', '.join(MODEL_SPECS)}")
    exporters = list(EXPORTERS) if args.exporter == "both" else [args.exporter]
    rows: list[tuple[str, str, float, float, float]] = []
    failed = False
    for name in names:
        spec = MODEL_SPECS[name]
        module = spec.build()
        for exporter in exporters:
            path = args.out / f"{name}.{exporter}.onnx"
            start = time.perf_counter_ns()
            export_module(module, spec, exporter, path)
            seconds = (time.perf_counter_ns() - start) / 1e9
            diff = float("nan") if args.no_verify else verify_export(path, module, spec)
            failed |= diff > args.atol
            rows.append((name, exporter, seconds, path.stat().st_size / 2**20, diff))
    print(f"{'model':<14}{'exporter':<13}{'export s':>9}{'MiB':>9}{'max |diff|':>12}")
    for name, exporter, seconds, mib, diff in rows:
        print(f"{name:<14}{exporter:<13}{seconds:>9.1f}{mib:>9.1f}{diff:>12.2e}")
    print(f"torch {torch.__version__}, onnx {onnx.__version__}, onnxruntime {ort.__version__}")
    if failed:
        print(f"FAILED: some outputs differ from torch by more than {args.atol}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

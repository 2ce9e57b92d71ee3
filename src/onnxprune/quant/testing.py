"""Tiny models for the quantization tests, one builder per topology (weights seeded).

Shared by ``tests/test_quant_*.py`` (like :mod:`onnxprune.testing`, importable without the
tests folder on the path)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx_ir as ir

from onnxprune.io import save
from onnxprune.testing import model_from_text

__all__ = ["conv_net", "image_calib", "matmul_net", "write", "write_calib"]


def conv_net(seed: int = 0, opset: int = 17) -> ir.Model:
    """Conv(3->8)+Relu -> Conv(8->8)+bias -> Add(skip) -> Relu -> GAP -> Flatten -> Gemm(8->4)."""
    rng = np.random.default_rng(seed)
    text = f"""
    <ir_version: 8, opset_import: ["" : {opset}]>
    g (float[N,3,8,8] x, float[8,3,3,3] w1, float[8] b1, float[8,8,3,3] w2, float[8] b2,
       float[4,8] wg, float[4] bg) => (float[N,4] y) {{
        c1 = Conv <pads = [1,1,1,1]> (x, w1, b1)
        r1 = Relu (c1)
        c2 = Conv <pads = [1,1,1,1]> (r1, w2, b2)
        s = Add (c2, r1)
        r2 = Relu (s)
        p = GlobalAveragePool (r2)
        f = Flatten (p)
        y = Gemm <transB = 1> (f, wg, bg)
    }}
    """
    weights = {
        "w1": rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3,
        "b1": rng.standard_normal(8).astype(np.float32) * 0.1,
        "w2": rng.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.15,
        "b2": rng.standard_normal(8).astype(np.float32) * 0.1,
        "wg": rng.standard_normal((4, 8)).astype(np.float32),
        "bg": rng.standard_normal(4).astype(np.float32) * 0.1,
    }
    return model_from_text(text, weights)


def matmul_net(weight: np.ndarray, seq: str = "S") -> ir.Model:
    """y = x @ w with x float[B, seq, K]."""
    k, n = weight.shape
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[B,{seq},{k}] x, float[{k},{n}] w) => (float[B,{seq},{n}] y) {{
        y = MatMul (x, w)
    }}
    """
    return model_from_text(text, {"w": weight})


def write(model: ir.Model, folder: Path, name: str = "model.onnx") -> Path:
    """Save ``model`` into ``folder``."""
    return save(model, folder / name)


def write_calib(folder: Path, name: str = "calib.npz", **arrays: np.ndarray) -> Path:
    """Write a calibration .npz (axis 0 indexes samples)."""
    path = folder / name
    # numpy's stub matches a str-keyed dict against ``allow_pickle: bool`` as well
    np.savez(path, **cast(dict[str, Any], arrays))
    return path


def image_calib(folder: Path, count: int = 16, seed: int = 1) -> Path:
    """Calibration data for :func:`conv_net`."""
    rng = np.random.default_rng(seed)
    return write_calib(folder, x=rng.standard_normal((count, 1, 3, 8, 8)).astype(np.float32))

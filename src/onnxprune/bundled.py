"""Bundled default model and data: a small CNN trained on scikit-learn's digits dataset."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["default_calibration", "default_model", "default_test_set"]


def _path(name: str) -> Path:
    return Path(str(resources.files("onnxprune") / "data" / name))


def default_model() -> Path:
    """The bundled digits CNN (input ``input`` [batch, 1, 8, 8], output ``logits``)."""
    return _path("digits_cnn.onnx")


def default_calibration() -> Path:
    """Calibration samples for the digits CNN (training split)."""
    return _path("digits_calib.npz")


def default_test_set() -> Path:
    """Held-out digits (keys ``input`` and ``label``) for measuring accuracy."""
    return _path("digits_test.npz")

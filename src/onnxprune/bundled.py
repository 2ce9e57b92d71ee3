"""Bundled models and data, trained on scikit-learn's real digits (no download).

Two models ship with onnxprune:

* the **default model** (:func:`default_model`), what ``onnxprune optimize`` and
  ``onnxprune inspect`` use without a MODEL: a small residual CNN on the digits upsampled
  to 32x32 (48.5 M MACs, 308 K parameters), big enough that pruning and int8 pay on a CPU
  (``models/train_default.py`` writes it);
* the **digits CNN** (:func:`digits_model`), a 338 K-MAC fixture that runs in microseconds,
  for tests and benchmarks that need real data but no latency (``models/train_digits.py``).

Each comes with calibration samples from its training split (key ``input``, axis 0 indexes
samples, ``x[i:i+1]`` is one feed) and its held-out test split (keys ``input``, ``label``).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = [
    "default_calibration",
    "default_model",
    "default_test_set",
    "digits_calibration",
    "digits_model",
    "digits_test_set",
]


def _path(name: str) -> Path:
    return Path(str(resources.files("onnxprune") / "data" / name))


def default_model() -> Path:
    """The default model: the digits ResNet (input ``input`` [batch, 1, 32, 32], output
    ``logits`` [batch, 10]); BatchNormalization nodes are kept for canonicalize to fold."""
    return _path("resnet_digits.onnx")


def default_calibration() -> Path:
    """Calibration samples for the default model: 384 upsampled training digits."""
    return _path("resnet_digits_calib.npz")


def default_test_set() -> Path:
    """The default model's held-out split (keys ``input`` [360, 1, 32, 32] and ``label``)."""
    return _path("resnet_digits_test.npz")


def digits_model() -> Path:
    """The tiny digits CNN fixture (input ``input`` [batch, 1, 8, 8], output ``logits``)."""
    return _path("digits_cnn.onnx")


def digits_calibration() -> Path:
    """Calibration samples for the digits CNN: 256 training digits [256, 1, 8, 8]."""
    return _path("digits_calib.npz")


def digits_test_set() -> Path:
    """The digits CNN's held-out split (keys ``input`` [360, 1, 8, 8] and ``label``)."""
    return _path("digits_test.npz")

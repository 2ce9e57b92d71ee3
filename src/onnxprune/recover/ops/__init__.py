"""Replay rules: one function per ONNX op (default domain), written with torch ops.

A rule takes the node's inputs (torch tensors; ``None`` for an omitted optional input), its
attributes as plain Python values and the opset version, and returns the node's outputs in
order (``None`` for an output it does not compute). Rules are differentiable wherever the ONNX
op is; integer and shape computations run on int64 tensors and are constant in practice.

Math that is not just "call the torch function":

* Conv / pooling pads are ONNX ``[b1, b2, ..., e1, e2, ...]``; asymmetric pads are applied with
  ``F.pad`` (``-inf`` for MaxPool). ``auto_pad=SAME_*``: ``total = max(0, (ceil(n/s) - 1) * s
  + (k - 1) * d + 1 - n)``, the odd pixel at the end (UPPER) or the start (LOWER).
* AveragePool with explicit pads is ``sum-pool(x padded with 0) / sum-pool(ones padded with
  c)``, c = 1 when ``count_include_pad`` else 0; any divisor torch uses cancels in the ratio.
* ConvTranspose: the full transposed convolution, ``output_padding`` appended at the end,
  then ``pads`` cropped (negative F.pad); with ``output_shape``, ``total = s * (n - 1) +
  output_padding + (k - 1) * d + 1 - output_shape`` split as for SAME.
* Resize (nearest, linear): per axis, output coordinate -> input coordinate by the
  ``coordinate_transformation_mode``, then a gather (nearest, with ``nearest_mode``) or a
  two-tap linear interpolation, separably over the resized axes.
* QuantizeLinear rounds with a straight-through estimator: ``q = t + (round(t) - t).detach()``
  with ``t = x / scale``, so gradients pass the rounding as identity (and are zero where the
  saturation clamps); the result stays a float tensor holding integer values.
"""

from __future__ import annotations

from onnxprune.recover.ops import elementwise, nn, shape
from onnxprune.recover.ops._base import RULES, TORCH_DTYPES, Rule, has_rule
from onnxprune.recover.ops.nn import fake_quantize

__all__ = ["RULES", "TORCH_DTYPES", "Rule", "fake_quantize", "has_rule"]

_MODULES = (elementwise, nn, shape)  # imported for their registrations

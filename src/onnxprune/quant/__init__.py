"""int8 and float16 quantization (``onnxprune quantize``).

Modules: :mod:`calibrate` (streaming statistics, range methods), :mod:`params` (scales and
zero points), :mod:`placement` (where Q/DQ go), :mod:`rewrite` (QDQ insertion), :mod:`vnni`
(u8s8 saturation remedy), :mod:`analysis` (SQNR, int8 MAC share), :mod:`mixed` (budget),
:mod:`bias` (bias correction), :mod:`refine` (learned rounding, AdaRound; imports torch),
:mod:`dynamic`, :mod:`fp16`, :mod:`api` (file level).
"""

from onnxprune.quant.api import MODES, TARGETS, quantize_file
from onnxprune.quant.calibrate import METHODS, Calibrator, TensorStats
from onnxprune.quant.report import QuantizeResult

__all__ = [
    "METHODS",
    "MODES",
    "TARGETS",
    "Calibrator",
    "QuantizeResult",
    "TensorStats",
    "quantize_file",
]

"""``onnxprune optimize``: recipes of steps under an accuracy budget."""

from onnxprune.optimize.api import DEFAULT_PRESET, optimize
from onnxprune.optimize.recipe import PRESETS, Recipe, load_recipe, preset
from onnxprune.optimize.report import OptimizeReport

__all__ = [
    "DEFAULT_PRESET",
    "PRESETS",
    "OptimizeReport",
    "Recipe",
    "load_recipe",
    "optimize",
    "preset",
]

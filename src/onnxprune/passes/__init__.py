"""Graph rewriting passes."""

from onnxprune.passes.base import Change, Pass, PassReport, Skip

__all__ = ["Change", "Pass", "PassReport", "Skip"]

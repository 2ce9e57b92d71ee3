"""Reference models generated on demand and cached on disk.

The reference models (ResNets, MobileNetV2, detector, encoder, ...) are not shipped: they
are built and exported by ``models/export.py`` in a source checkout, which needs torch.
:func:`reference_model_path` exports a model the first time it is asked for and returns
the cached file afterwards.

Cache folder: ``$ONNXPRUNE_CACHE`` if set, else ``~/.cache/onnxprune/models``. Files are
named ``<model>.<exporter>.onnx``; they depend on the torch version that wrote them, so
pass ``refresh=True`` (or delete the file) after upgrading torch.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType

from onnxprune.errors import UsageError

__all__ = ["EXPORTERS", "cache_dir", "load_export_module", "reference_model_path"]

logger = logging.getLogger(__name__)

EXPORTERS = ("torchscript", "dynamo")
_MODULE_NAME = "onnxprune_reference_export"


def cache_dir() -> Path:
    """The folder reference models are cached in (not created here)."""
    env = os.environ.get("ONNXPRUNE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "onnxprune" / "models"


def _export_script() -> Path:
    # src/onnxprune/models_cache.py -> <checkout>/models/export.py
    return Path(__file__).resolve().parents[2] / "models" / "export.py"


def load_export_module() -> ModuleType:
    """Import ``models/export.py`` from the source checkout (needs torch).

    Raises:
        UsageError: torch (or onnxscript) is not installed, or this is not a source checkout.
    """
    if _MODULE_NAME in sys.modules:
        return sys.modules[_MODULE_NAME]
    for requirement in ("torch", "onnxscript"):
        if importlib.util.find_spec(requirement) is None:
            raise UsageError(
                f"generating reference models needs {requirement}, which is not installed; "
                "install the export extra: pip install 'onnxprune[export]'"
            )
    script = _export_script()
    if not script.is_file():
        raise UsageError(
            f"reference model export code not found at {script}; it ships only with a "
            "source checkout of onnxprune (the models/ folder)"
        )
    spec = importlib.util.spec_from_file_location(_MODULE_NAME, script)
    if spec is None or spec.loader is None:  # pragma: no cover - a .py file always has one
        raise UsageError(f"cannot import {script}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[_MODULE_NAME] = module  # dataclasses look their module up while executing
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[_MODULE_NAME]
        raise
    return module


def reference_model_path(
    name: str, exporter: str = "torchscript", *, refresh: bool = False
) -> Path:
    """Return the path of reference model ``name`` exported with ``exporter``.

    The model is exported into :func:`cache_dir` on first use (a few seconds to ~20 s for
    the largest); later calls return the cached file. The file is written to a temporary
    name and renamed, so an interrupted export never leaves a truncated model behind.

    Args:
        name: One of the names in ``models/export.py`` (``resnet18``, ``resnet50``,
            ``mobilenet_v2``, ``detector``, ``encoder``, ``mlp``, ``fusion``).
        exporter: ``torchscript`` or ``dynamo``.
        refresh: Export again even if a cached file exists.

    Raises:
        UsageError: Unknown model or exporter, or torch / the export code is unavailable.
    """
    if exporter not in EXPORTERS:
        raise UsageError(f"unknown exporter {exporter!r}; choose from {', '.join(EXPORTERS)}")
    folder = cache_dir()
    target = folder / f"{name}.{exporter}.onnx"
    if target.is_file() and not refresh:
        return target
    module = load_export_module()
    if name not in module.MODEL_SPECS:
        raise UsageError(
            f"unknown reference model {name!r}; choose from {', '.join(module.MODEL_SPECS)}"
        )
    folder.mkdir(parents=True, exist_ok=True)
    logger.info("exporting reference model %s with %s into %s", name, exporter, folder)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".export-") as tmp:
        exported = module.export_model(name, exporter, tmp)
        os.replace(exported, target)
    return target

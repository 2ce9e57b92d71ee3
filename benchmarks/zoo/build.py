"""Build the zoo: every real model with its calibration and evaluation data.

Usage::

    python benchmarks/zoo/build.py [--only NAME ...] [--cache DIR]

Runs ``build(cache)`` of every module in ``benchmarks/zoo`` whose name does not start with
``_`` (helpers such as ``images.py`` that have no ``build`` are skipped), one after the
other, and writes ``cache/manifest.json``: the entries, the versions of the packages that
made them, and the seconds each module took. Modules reuse what they built before, so a
second run takes seconds. ``--only`` rebuilds the named modules and keeps the other modules'
records from the existing manifest. A module that fails is reported with its error, the
others still build, and the exit status is 1.

The cache is ``--cache``, else ``$ONNXPRUNE_ZOO``, else ``benchmarks/zoo/.cache``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import json
import logging
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ZOO = Path(__file__).resolve().parent
if str(ZOO) not in sys.path:
    sys.path.insert(0, str(ZOO))

from _common import ZooEntry, cache_dir, write_json  # noqa: E402

__all__ = ["discover", "main", "run_module"]

NOT_MODULES = ("build", "scoreboard")
# Distributions whose versions shape the built files (absent ones are recorded as null).
PACKAGES = (
    "onnxprune", "torch", "onnx", "onnxruntime", "onnxscript", "numpy", "transformers",
    "tokenizers", "scikit-image", "scikit-learn", "pillow",
)  # fmt: skip


def discover() -> list[str]:
    """Names of the zoo's modules, sorted (not ``_*``, not this script or the scoreboard)."""
    return sorted(
        path.stem
        for path in ZOO.glob("*.py")
        if not path.stem.startswith("_") and path.stem not in NOT_MODULES
    )


def versions() -> dict[str, str | None]:
    """Python's and each of ``PACKAGES``' versions."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def _check(entries: list[ZooEntry], cache: Path) -> None:
    """Refuse entries that are not ZooEntry or whose files are missing."""
    for entry in entries:
        if not isinstance(entry, ZooEntry):
            raise TypeError(f"build() returned {type(entry).__name__}, not ZooEntry")
        for field in ("model", "calib", "eval"):
            if not (cache / getattr(entry, field)).exists():
                raise FileNotFoundError(f"{entry.name}: {field} {getattr(entry, field)} missing")


def run_module(name: str, cache: Path) -> dict[str, Any] | None:
    """Build one module; its record (entries, seconds, error), or None for a helper module."""
    start = time.perf_counter()
    record: dict[str, Any] = {"entries": [], "error": None}
    try:
        module = importlib.import_module(name)
        if not callable(getattr(module, "build", None)):
            return None
        entries = list(module.build(cache))
        _check(entries, cache)
        record["entries"] = [entry.to_dict() for entry in entries]
    except Exception as error:
        record["error"] = f"{type(error).__name__}: {error}"
        record["traceback"] = traceback.format_exc()
    record["seconds"] = round(time.perf_counter() - start, 1)
    record["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return record


def _previous(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text()).get("modules", {})
    except (json.JSONDecodeError, AttributeError):
        return {}


def write_manifest(cache: Path, modules: dict[str, dict[str, Any]]) -> Path:
    """``cache/manifest.json``: entries of every module in name order, versions, timings."""
    entries = [entry for name in sorted(modules) for entry in modules[name]["entries"]]
    names = [entry["name"] for entry in entries]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"entry names used twice: {', '.join(duplicates)}")
    path = cache / "manifest.json"
    manifest = {
        "cache": str(cache),
        "versions": versions(),
        "modules": {name: modules[name] for name in sorted(modules)},
        "entries": entries,
    }
    write_json(path, manifest)
    return path


def _print_row(name: str, record: dict[str, Any] | None) -> None:
    if record is None:
        print(f"{name:<16} helper (no build), skipped", flush=True)
        return
    status = "FAILED " + record["error"] if record["error"] else "ok"
    count = len(record["entries"])
    print(f"{name:<16} {record['seconds']:>7.1f} s  {count} entries  {status}", flush=True)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; 0 when every module built, 1 otherwise."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="+", metavar="NAME", help="build only these modules")
    parser.add_argument("--cache", type=Path, help="cache folder (default: $ONNXPRUNE_ZOO)")
    args = parser.parse_args(argv)
    available = discover()
    unknown = sorted(set(args.only or ()) - set(available))
    if unknown:
        parser.error(f"unknown modules {', '.join(unknown)}; choose from {', '.join(available)}")
    if args.cache:
        os.environ["ONNXPRUNE_ZOO"] = str(args.cache.resolve())
    cache = cache_dir()
    # Silence "torchvision is not installed. Skipping torchvision::nms" from the dynamo exporter.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    modules = _previous(cache / "manifest.json") if args.only else {}
    modules = {name: record for name, record in modules.items() if name in available}
    start = time.perf_counter()
    failed = []
    for name in args.only or available:
        record = run_module(name, cache)
        _print_row(name, record)
        if record is None:
            continue
        modules[name] = record
        if record["error"]:
            failed.append(name)
            print(record["traceback"], file=sys.stderr, flush=True)
    path = write_manifest(cache, modules)
    total = time.perf_counter() - start
    count = sum(len(record["entries"]) for record in modules.values())
    print(f"{count} entries in {path} ({total:.1f} s)")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

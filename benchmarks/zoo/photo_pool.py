"""Photos v3: several hundred more real photos, read out of pinned Debian packages and a wheel.

The image models' first photo sets (``images.py``: scikit-image, scikit-learn, matplotlib and
a few wheels) hold 38 photos, too few to fit on or to judge a fit by: a pruned MobileNetV2
fitted on 64 crops of 19 photos agreed 0.78 on those crops and 0.39 on unseen ones. This pool
adds the real photographs inside pinned archives that apt and pip can fetch here:

* ``gcompris-qt-data`` (Debian 12): animal, fish, tool, monument and landscape photos inside
  the Qt resource files (``.rcc``) of some GCompris activities;
* ``tuxpaint-stamps-default``: cut-out photos of animals, food, plants, household objects,
  instruments, clothes, vehicles (transparent background, composited onto ImageNet's mean
  grey here);
* ``scratch``: photo backgrounds (rooms, landscapes, streets, sports grounds);
* ``opencv-doc``: the classic sample photos (fruits, baboon, squirrel, butterfly...);
* ``tuxpaint-data`` templates and ``mate-backgrounds`` nature close-ups;
* ``foolbox==3.3.4`` (PyPI): 20 ImageNet validation images, used for evaluation only.

Drawings, icons and renders inside those folders are dropped by a fixed photo test on a
256-pixel thumbnail of the opaque pixels: at least 2,000 distinct colours, at most 30 % of
horizontally adjacent pixel pairs exactly equal, short side at least 96 pixels (the ImageNet
images are not screened: three of them fail the test and are photos all the same).

Split: near-duplicates (the same monument cropped twice in GCompris, ``rubberwhale1/2`` in
Tux Paint) sit in one folder or activity, so whole *groups* (a folder, an activity, a source)
go to one side. Groups are dealt in name order to whichever side is further below its share
(``CALIB_SHARE`` of the photos to calibration); the ImageNet images all go to evaluation.
Everything is deterministic for the pinned versions: the photo list, its order, the split.
"""

from __future__ import annotations

import fnmatch
import io
import os
import struct
import subprocess
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

__all__ = ["CALIB_SHARE", "PoolPhoto", "pool"]

CALIB_SHARE = 0.7
MIN_SIDE = 96
MIN_COLOURS = 2000
MAX_FLAT = 0.3
#: ImageNet's mean colour: what transparent pixels of a cut-out become.
BACKDROP = (124, 116, 104)

Split = Literal["calib", "eval", "any"]


@dataclass(frozen=True)
class _Source:
    """Photos of one pinned archive: which members, how they are grouped, which side."""

    key: str  # short prefix of photo names, e.g. "tux"
    kind: Literal["deb", "wheel"]
    spec: str  # "name=version" for apt, "name==version" for pip
    members: tuple[str, ...]  # fnmatch patterns of archive members
    exclude: tuple[str, ...] = ()
    rcc: bool = False  # members are Qt resource files holding the photos
    split: Split = "any"
    group_depth: int = 1  # folders of the member path (after the common root) naming its group
    screened: bool = True  # members pass :func:`is_photo` (False: known photos, e.g. ImageNet)


_GCOMPRIS_RCC = (
    "categorization",
    "clickgame",
    "erase",
    "explore_farm_animals",
    "explore_monuments",
    "explore_world_animals",
    "explore_world_music",
    "leftright",
    "louis-braille",
)
_TUX_FOLDERS = (
    "animals",
    "clothes",
    "food",
    "hobbies",
    "household",
    "medical",
    "military",
    "plants",
    "seasonal",
    "sports",
    "vehicles",
)
_STAMPS = "./usr/share/tuxpaint/stamps/"
_OPENCV = "./usr/share/doc/opencv-doc/examples/data/"
_OPENCV_PHOTOS = (
    "HappyFish",
    "apple",
    "baboon",
    "building",
    "butterfly",
    "fruits",
    "home",
    "messi5",
    "orange",
    "squirrel_cls",
)

SOURCES = (
    _Source(
        "gc",
        "deb",
        "gcompris-qt-data=3.1-2",
        tuple(f"./usr/share/gcompris-qt/rcc/{name}.rcc" for name in _GCOMPRIS_RCC),
        rcc=True,
    ),
    _Source(
        "tux",
        "deb",
        "tuxpaint-stamps-default=2022.06.04-1",
        tuple(f"{_STAMPS}{folder}/*.png" for folder in _TUX_FOLDERS),
        exclude=("*/cartoon/*", "*/toys/*"),
        group_depth=2,
    ),
    _Source(
        "scratch",
        "deb",
        "scratch=1.4.0.6~dfsg1-6.1",
        ("./usr/share/scratch/Media/Backgrounds/*/*.jpg",),
    ),
    _Source(
        "opencv",
        "deb",
        "opencv-doc=4.6.0+dfsg-12",
        tuple(f"{_OPENCV}{name}.jpg" for name in _OPENCV_PHOTOS),
        group_depth=0,
    ),
    _Source(
        "tuxtpl",
        "deb",
        "tuxpaint-data=1:0.9.28-sdl2-1",
        ("./usr/share/tuxpaint/templates/*.jpg",),
        group_depth=0,
    ),
    _Source(
        "mate",
        "deb",
        "mate-backgrounds=1.26.0-1",
        ("./usr/share/backgrounds/mate/nature/*.jpg",),
        group_depth=0,
    ),
    _Source(
        "imagenet",
        "wheel",
        "foolbox==3.3.4",
        ("foolbox/data/imagenet_*.jpg",),
        split="eval",
        group_depth=0,
        screened=False,
    ),
)


@dataclass(frozen=True)
class PoolPhoto:
    """One photo of the pool: its name, group, side and where its bytes are cached."""

    name: str
    group: str
    split: Literal["calib", "eval"]
    path: Path

    def load(self) -> np.ndarray:
        """RGB uint8 [H, W, 3]; transparent pixels composited onto :data:`BACKDROP`."""
        return _rgb(Image.open(self.path))


# ------------------------------------------------------------------ archives


def _deb(spec: str, folder: Path) -> Path:
    """``apt-get download`` the pinned package into ``folder`` (once); its path."""
    folder.mkdir(parents=True, exist_ok=True)
    name = spec.split("=", 1)[0]
    found = sorted(folder.glob(f"{name}_*.deb"))
    if not found:
        subprocess.run(["apt-get", "download", "-q", spec], cwd=folder, check=True)
        found = sorted(folder.glob(f"{name}_*.deb"))
    if not found:
        raise RuntimeError(f"apt-get download {spec}: no .deb in {folder}")
    return found[-1]


def _deb_data(path: Path) -> tarfile.TarFile:
    """The data tarball of a .deb (an ``ar`` archive), opened for streaming."""
    with path.open("rb") as handle:
        if handle.read(8) != b"!<arch>\n":
            raise RuntimeError(f"{path.name}: not an ar archive")
        while header := handle.read(60):
            member = header[:16].decode().strip().rstrip("/")
            size = int(header[48:58])
            if member.startswith("data.tar"):
                return tarfile.open(fileobj=io.BytesIO(handle.read(size)), mode="r:*")
            handle.seek(size + size % 2, os.SEEK_CUR)
    raise RuntimeError(f"{path.name}: no data.tar member")


def _wheel_members(source: _Source, cache: Path) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the wheel's members that ``source`` selects."""
    import zipfile

    from _common import pip_wheel

    with zipfile.ZipFile(pip_wheel(source.spec, cache)) as zf:
        for member in sorted(zf.namelist()):
            if _matches(member, source):
                yield member, zf.read(member)


def _deb_members(source: _Source, cache: Path) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the package's files that ``source`` selects (others are not read)."""
    with _deb_data(_deb(source.spec, cache / "debs")) as tar:
        for info in tar:
            if info.isfile() and _matches(info.name, source):
                handle = tar.extractfile(info)
                if handle is not None:
                    yield info.name, handle.read()


def _rcc_files(data: bytes) -> Iterator[tuple[str, bytes]]:
    """(path, bytes) of every file in a Qt binary resource (``rcc``) file.

    Layout: ``qres``, version, then the offsets of the tree, data and names blocks. A tree
    node is (name offset, flags, ...): a directory (flag 2) holds (child count, first child);
    a file holds a data offset, its data a big-endian size then the bytes, zlib-compressed
    (flag 1, after a 4-byte uncompressed size) or zstd-compressed (flag 4, not used here).
    """
    if data[:4] != b"qres":
        raise RuntimeError("not a Qt resource file")
    version, tree, payload, names = struct.unpack(">IIII", data[4:20])
    node_size = 14 if version < 2 else 22

    def name(offset: int) -> str:
        (length,) = struct.unpack(">H", data[names + offset : names + offset + 2])
        start = names + offset + 6
        return data[start : start + 2 * length].decode("utf-16-be")

    def walk(index: int, prefix: str) -> Iterator[tuple[str, bytes]]:
        at = tree + index * node_size
        name_offset, flags = struct.unpack(">IH", data[at : at + 6])
        path = prefix + (name(name_offset) if index else "")
        if flags & 2:
            count, first = struct.unpack(">II", data[at + 6 : at + 14])
            for child in range(first, first + count):
                yield from walk(child, path + "/")
            return
        (offset,) = struct.unpack(">I", data[at + 10 : at + 14])
        (size,) = struct.unpack(">I", data[payload + offset : payload + offset + 4])
        blob = data[payload + offset + 4 : payload + offset + 4 + size]
        if flags & 4:
            raise RuntimeError(f"{path}: zstd-compressed resource")
        yield path, zlib.decompress(blob[4:]) if flags & 1 else blob

    yield from walk(0, "")


# ------------------------------------------------------------------ photos


def _rgb(image: Image.Image) -> np.ndarray:
    image.load()
    if image.mode in ("RGBA", "LA", "P", "PA"):
        rgba = image.convert("RGBA")
        backdrop = Image.new("RGBA", rgba.size, (*BACKDROP, 255))
        return np.asarray(Image.alpha_composite(backdrop, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))


def is_photo(image: Image.Image) -> bool:
    """The fixed photo test of the module docstring (colours, flatness, size)."""
    if min(image.size) < MIN_SIDE:
        return False
    thumb = image.convert("RGBA")
    thumb.thumbnail((256, 256))
    rgba = np.asarray(thumb).astype(np.int64)
    opaque = rgba[..., 3] > 200
    pixels = rgba[..., :3][opaque]
    if len(pixels) == 0:
        return False
    colours = len(np.unique(pixels[:, 0] * 65536 + pixels[:, 1] * 256 + pixels[:, 2]))
    pairs = opaque[:, 1:] & opaque[:, :-1]
    equal = (np.abs(np.diff(rgba[..., :3], axis=1)).sum(-1) == 0)[pairs]
    return colours >= MIN_COLOURS and (equal.mean() if equal.size else 1.0) <= MAX_FLAT


def _matches(member: str, source: _Source) -> bool:
    return any(fnmatch.fnmatchcase(member, p) for p in source.members) and not any(
        fnmatch.fnmatchcase(member, p) for p in source.exclude
    )


def _group(source: _Source, member: str, path: str) -> str:
    """The group of file ``path`` of ``member``: for a Qt resource the activity it belongs
    to (categorization's monuments are explore_monuments' photos again, so they join that
    group), else ``group_depth`` folders below the pattern's fixed root."""
    if source.rcc:
        activity = "explore_monuments" if "/monuments/" in path else Path(member).stem
        return f"{source.key}/{activity}"
    root = os.path.commonpath([p.split("*")[0] for p in source.members] + [member])
    parts = os.path.relpath(member, root).split("/")[:-1]
    return "/".join([source.key, *parts[: source.group_depth]])


def _extract(source: _Source, cache: Path) -> list[tuple[str, str, Path]]:
    """(name, group, cached file) of the source's photos, extracted once under ``cache``."""
    folder = cache / "photos_v3" / source.key
    index = folder / "index.tsv"
    if index.is_file():
        rows = [line.split("\t") for line in index.read_text().splitlines()]
        return [(n, g, folder / f) for n, g, f in rows]
    members: Callable[[_Source, Path], Iterator[tuple[str, bytes]]] = (
        _deb_members if source.kind == "deb" else _wheel_members
    )
    rows: list[tuple[str, str, str]] = []
    staging = folder.with_suffix(".partial")
    staging.mkdir(parents=True, exist_ok=True)
    for member, data in members(source, cache):
        files = _rcc_files(data) if source.rcc else iter([(member, data)])
        for path, blob in files:
            if Path(path).suffix.lower() not in (".webp", ".jpg", ".jpeg", ".png"):
                continue
            group = _group(source, member, path)
            try:
                image = Image.open(io.BytesIO(blob))
                image.load()
            except OSError:
                continue
            if source.screened and not is_photo(image):
                continue
            name = f"{group}/{Path(path).stem}".replace("\t", " ")
            target = f"{len(rows):04d}{Path(path).suffix.lower()}"
            (staging / target).write_bytes(blob)
            rows.append((name, group, target))
    names = [r[0] for r in rows]
    if len(set(names)) != len(names):
        rows = [(f"{n}#{i}", g, f) for i, (n, g, f) in enumerate(rows)]
    (staging / "index.tsv").write_text("".join("\t".join(r) + "\n" for r in rows))
    staging.rename(folder)
    return [(n, g, folder / f) for n, g, f in rows]


def _deal(groups: dict[str, int]) -> dict[str, Literal["calib", "eval"]]:
    """Each group to the side further below its share, in group-name order."""
    counts = {"calib": 0, "eval": 0}
    share = {"calib": CALIB_SHARE, "eval": 1 - CALIB_SHARE}
    sides: dict[str, Literal["calib", "eval"]] = {}
    for group in sorted(groups):
        total = sum(counts.values()) + groups[group]
        side: Literal["calib", "eval"] = max(
            ("calib", "eval"), key=lambda s: share[s] * total - counts[s]
        )
        sides[group] = side
        counts[side] += groups[group]
    return sides


def pool(cache: Path) -> list[PoolPhoto]:
    """Every photo of the pool with its side, in a fixed order (sources, then members)."""
    extracted = [(s, row) for s in SOURCES for row in _extract(s, cache)]
    sizes: dict[str, int] = {}
    for source, (_, group, _) in extracted:
        if source.split == "any":
            sizes[group] = sizes.get(group, 0) + 1
    sides = _deal(sizes)
    return [
        PoolPhoto(name, group, sides[group] if source.split == "any" else source.split, path)
        for source, (name, group, path) in extracted
    ]

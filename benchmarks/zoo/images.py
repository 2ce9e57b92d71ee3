"""Real photos for the image models of the zoo, split by photo, with ImageNet preprocessing.

The photos are the ones bundled inside the scikit-image wheel (no pooch download) and
scikit-learn's ``load_sample_images`` (china, flower). Calibration crops come from
``CALIB_PHOTOS`` and evaluation crops from ``EVAL_PHOTOS``: no photo contributes to both.
The stereo pair ``motorcycle_left``/``motorcycle_right`` shows one scene, so only the left
view is used; ``skimage.data.cat`` is ``chelsea`` again and is not used.

Each photo gives several deterministic crops: crop 0 is the whole photo, the others a seeded
random region (area 30-100% of the shorter side's square, aspect ratio 3/4-4/3, random
position, horizontal flip half of the time). Every crop gets ImageNet preprocessing: resize
the shorter side to 256 (bilinear, antialiased), centre crop 224, scale to [0, 1], normalise
with the ImageNet mean/std, NCHW float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import numpy as np
from PIL import Image

__all__ = [
    "CALIB_PHOTOS",
    "EVAL_PHOTOS",
    "crops",
    "imagenet_feeds",
    "photo",
    "preprocess",
    "split_description",
]

# Colour photos first, then greyscale ones (replicated to three channels).
CALIB_PHOTOS = (
    "astronaut",
    "coffee",
    "china",
    "hubble_deep_field",
    "immunohistochemistry",
    "camera",
    "coins",
    "grass",
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
)

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


def _loaders() -> dict[str, Callable[[], np.ndarray]]:
    return {
        name: _sklearn(name) if name in ("china", "flower") else _skimage(name)
        for name in (*CALIB_PHOTOS, *EVAL_PHOTOS)
    }


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
    names = (*CALIB_PHOTOS, *EVAL_PHOTOS)
    rng = np.random.default_rng([seed, names.index(name)])
    found = [preprocess(image)] if count > 0 else []
    found += [preprocess(np.ascontiguousarray(_random_crop(image, rng))) for _ in range(count - 1)]
    return found


def _photos(split: Literal["calib", "eval"]) -> tuple[str, ...]:
    if split not in ("calib", "eval"):
        raise ValueError(f"split must be 'calib' or 'eval', not {split!r}")
    return CALIB_PHOTOS if split == "calib" else EVAL_PHOTOS


def imagenet_feeds(
    split: Literal["calib", "eval"], input_name: str = "input", count: int = 64, seed: int = 0
) -> list[dict[str, np.ndarray]]:
    """``count`` feeds ``{input_name: float32 [1, 3, 224, 224]}`` from the split's photos.

    Photos take turns (crop 0 of every photo, then crop 1...), so any prefix is balanced.
    """
    photos = _photos(split)
    per_photo = math.ceil(count / len(photos))
    by_photo = [crops(name, per_photo, seed) for name in photos]
    ordered = [by_photo[p][k] for k in range(per_photo) for p in range(len(photos))]
    return [{input_name: array} for array in ordered[:count]]


def split_description(calib: int, eval_count: int) -> str:
    """One line saying how ``imagenet_feeds`` cut calibration and evaluation."""
    return (
        f"calib: {calib} crops of photos {', '.join(CALIB_PHOTOS)}; "
        f"eval: {eval_count} crops of photos {', '.join(EVAL_PHOTOS)} "
        "(scikit-image/scikit-learn bundled photos; no photo in both; crop 0 = whole photo, "
        "others seeded random scale/position/flip; ImageNet preprocessing 256 -> 224)"
    )

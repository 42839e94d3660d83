"""THE preprocessing: training, evaluation, predict and the app all go through `preprocess` (or its two halves,
`resize_images` then `normalise`, which the pipeline calls separately so augmentation can sit between them).

The `Preprocessing` spec is stored in every checkpoint's metadata, so inference repeats exactly what training did.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

NORMALISATIONS = ("image_zscore", "volume_zscore", "imagenet", "caffe")
_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
_CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], np.float32)
_EPS = 1e-6  # an all-black slice has zero variance

Stats = tuple[np.ndarray, np.ndarray]  # per-channel mean and std, each (3,)


@dataclass(frozen=True)
class Preprocessing:
    image_size: int
    normalisation: str

    def __post_init__(self) -> None:
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation {self.normalisation!r} is not one of {NORMALISATIONS}")
        if self.image_size < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocessing":
        return cls(image_size=int(d["image_size"]), normalisation=str(d["normalisation"]))


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, H, W, 3) -> uint8 (N, size, size, 3), bilinear (PIL, antialiased when shrinking)."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
    if images.shape[1:3] == (size, size):
        return images
    out = np.empty((len(images), size, size, 3), np.uint8)
    for i, im in enumerate(images):
        out[i] = np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR))
    return out


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """bool (H, W) -> bool (h, w), nearest-neighbour so the mask stays binary."""
    if mask.shape == tuple(shape):
        return mask.astype(bool, copy=False)
    h, w = shape
    return np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((w, h), Image.NEAREST)).astype(bool)


def volume_stats(images: np.ndarray) -> Stats:
    """Per-channel mean and std over a whole (N, S, S, 3) stack: the volume_zscore statistics of one patient."""
    x = images.astype(np.float64)
    return x.mean(axis=(0, 1, 2)).astype(np.float32), x.std(axis=(0, 1, 2)).astype(np.float32)


def normalise(images: np.ndarray, spec: Preprocessing, stats: Stats | None = None) -> np.ndarray:
    """(N, S, S, 3) pixel values in [0, 255] -> float32 model input.

    `stats` overrides the volume_zscore statistics (the pipeline passes the patient's, precomputed once).
    """
    x = images.astype(np.float32)
    if spec.normalisation == "image_zscore":
        mean = x.mean(axis=(1, 2), keepdims=True)
        std = x.std(axis=(1, 2), keepdims=True)
        return (x - mean) / (std + _EPS)
    if spec.normalisation == "volume_zscore":
        mean, std = stats if stats is not None else volume_stats(x)
        return (x - mean) / (std + _EPS)
    if spec.normalisation == "imagenet":
        return (x / 255.0 - _IMAGENET_MEAN) / _IMAGENET_STD
    # caffe (Keras ResNet50): RGB -> BGR, subtract the ImageNet BGR mean, no scaling.
    return x[..., ::-1] - _CAFFE_MEAN_BGR


def preprocess(images: np.ndarray, spec: Preprocessing, stats: Stats | None = None) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float32 (N, S, S, 3): bilinear resize to spec.image_size, then normalise.

    volume_zscore uses the statistics of the whole N stack, so pass a patient's full volume (or its `stats`).
    """
    return normalise(resize_images(images, spec.image_size), spec, stats)

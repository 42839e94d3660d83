"""THE preprocessing: training, evaluation, predict and the app all go through `preprocess` (or its two halves,
`resize_images` then `normalise`, which the pipeline calls separately so augmentation can sit between them).

The `Preprocessing` spec is stored in every checkpoint's metadata, so inference repeats exactly what training did.

Crop (`Preprocessing.crop`): "none" resizes the whole slice; "brain" first crops to `crop_box`, the square around
every pixel brighter than `BRAIN_THRESHOLD` (any channel, any slice of the volume) plus `CROP_MARGIN`, so the model's
pixels go to the head rather than the black background. `crop_box` is the one place a box is computed (training and
serving), and `mask_at_input_size` the one place a model-size probability map becomes a mask at the input size
(serving and cross-validation).

Grey background: kaggle_3m's background reads 0-7, but two of our 81 patients (TCGA_FG_7637, TCGA_FG_A4MU) have a
pre-contrast whose background reads 103 and 61, and the models missed their tumours. `preprocess` and `crop_box` first
make such a background black (`remove_grey_background`), deciding once per volume (`grey_background`); training reads
its slices the same way (`flaxtumor.data.pipeline`).

Context (`Preprocessing.context_slices` K, 2.5D input): the model sees slice i with its K neighbours on each side of
the patient volume, slices i-K..i+K concatenated on the channel axis in that order, 3(2K+1) channels. `stack_context`
is the one place neighbours are chosen (the nearest slice repeats past either end of the volume); `preprocess` ends
with it, and the training pipeline picks its cached slices with it. Each slice is normalised on its own, as alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from flaxtumor.config import DataConfig

NORMALISATIONS = ("image_zscore", "volume_zscore", "imagenet", "caffe")
CROPS = ("none", "brain")
CHANNELS = 3  # per slice: pre-contrast, FLAIR, post-contrast
PRE_CONTRAST, FLAIR, POST_CONTRAST = range(CHANNELS)
SEQUENCE_NAMES = ("pre-contrast", "FLAIR", "post-contrast")
# kaggle_3m's background reads 0-7 in uint8, tissue well above; the margin keeps the skull edge off the border.
BRAIN_THRESHOLD = 10
CROP_MARGIN = 8
# A sequence whose median outside the head (FLAIR <= BRAIN_THRESHOLD) is above this has a grey background. In our 81
# patients the per-volume median reads at most 6 where it is black and 61 or 103 where it is grey; one edge slice read
# alone reads 38, and the grey volumes' slices at least 60.
GREY_BACKGROUND = 50
# ... and only where a background exists: at least this share of the pixels outside the head (in our 81 volumes 35-80%,
# in any one slice at least 25%; a noise image has about 4%).
MIN_BACKGROUND = 0.2
_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
_CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], np.float32)
_EPS = 1e-6  # an all-black slice has zero variance

Stats = tuple[np.ndarray, np.ndarray]  # per-channel mean and std, each (3,)
Background = tuple[tuple[int, int], ...]  # (channel, level) of each sequence whose background is grey; () if none


def grey_background(slices: np.ndarray | Sequence[np.ndarray]) -> Background:
    """Which contrasts of one volume (uint8 (H, W, 3) slices, stacked or listed) have a grey background, and its
    level: the median of the channel over every pixel outside the head (FLAIR <= BRAIN_THRESHOLD) of every slice,
    where that median is above GREY_BACKGROUND and the outside at least MIN_BACKGROUND of the pixels. FLAIR itself
    defines the outside and is never grey here."""
    histograms = {PRE_CONTRAST: np.zeros(256, np.int64), POST_CONTRAST: np.zeros(256, np.int64)}
    pixels = 0
    for image in slices:  # one slice at a time, as crop_box reads a volume; a histogram: uint8 medians are cheap
        a = np.asarray(image)
        outside = a[..., FLAIR] <= BRAIN_THRESHOLD
        for c, histogram in histograms.items():
            histogram += np.bincount(a[..., c][outside], minlength=256)
        pixels += outside.size
    if histograms[PRE_CONTRAST].sum() < MIN_BACKGROUND * max(pixels, 1):
        return ()
    levels = {c: int(np.searchsorted(np.cumsum(h), h.sum() / 2)) for c, h in histograms.items()}
    return tuple((c, level) for c, level in levels.items() if level > GREY_BACKGROUND)


def remove_grey_background(images: np.ndarray, background: Background | None = None) -> np.ndarray:
    """uint8 (..., H, W, 3) with each grey `background` (default: `grey_background(images)`, the whole stack as one
    volume) made black: the level is subtracted inside the head and the outside set to 0, as in the rest of the data.
    Returns `images` itself when there is nothing to change."""
    background = grey_background(np.reshape(images, (-1, *np.shape(images)[-3:]))) if background is None else background
    if not background:
        return images
    out = np.array(images, copy=True)
    outside = out[..., FLAIR] <= BRAIN_THRESHOLD
    for c, level in background:
        inside = np.clip(out[..., c].astype(np.int16) - level, 0, 255).astype(np.uint8)
        out[..., c] = np.where(outside, np.uint8(0), inside)
    return out


def sequence_group(volume: np.ndarray) -> str:
    """Which MRI sequences a kaggle_3m volume (D, H, W, 3) really has. The dataset stores a sequence a patient lacks
    as an exact copy of FLAIR, so a contrast equal to FLAIR on every pixel is missing: "complete", "no
    pre-contrast", "no post-contrast" or "FLAIR only" (9 of our 81 patients are not complete, 5 FLAIR only)."""
    v = np.asarray(volume)
    if not v[..., FLAIR].any():  # an empty volume: nothing to tell
        return "complete"
    pre, post = (np.array_equal(v[..., c], v[..., FLAIR]) for c in (PRE_CONTRAST, POST_CONTRAST))
    return "FLAIR only" if pre and post else "no pre-contrast" if pre else "no post-contrast" if post else "complete"


def input_channels(context_slices: int) -> int:
    """The model's input channels with K context slices on each side: 3 per slice, 2K+1 slices."""
    return CHANNELS * (2 * context_slices + 1)


@dataclass(frozen=True)
class Preprocessing:
    image_size: int
    normalisation: str
    crop: str = "none"
    context_slices: int = 0  # K neighbours on each side as extra channels (segmenter only); see `stack_context`

    def __post_init__(self) -> None:
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation {self.normalisation!r} is not one of {NORMALISATIONS}")
        if self.image_size < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if self.crop not in CROPS:
            raise ValueError(f"crop {self.crop!r} is not one of {CROPS}")
        k = self.context_slices
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"context_slices must be a whole number >= 0, got {k!r}")

    @property
    def channels(self) -> int:
        """The model's input channels: 3, or 3(2K+1) with K context slices."""
        return input_channels(self.context_slices)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        # Defaults are written as before the option existed, so such metadata stays byte-identical.
        if self.crop == "none":
            del d["crop"]
        if self.context_slices == 0:
            del d["context_slices"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocessing":
        """Metadata written before the crop (or the context slices) existed has neither: it resized the whole slice
        ("none") and fed it alone (0)."""
        return cls(image_size=int(d["image_size"]), normalisation=str(d["normalisation"]),
                   crop=str(d.get("crop", "none")), context_slices=int(d.get("context_slices", 0)))

    @classmethod
    def from_config(cls, data: DataConfig) -> "Preprocessing":
        """What a run with this data config trains on (and its export records)."""
        return cls(data.image_size, data.normalisation, data.crop, data.context_slices)


class Box(NamedTuple):
    """A crop in input pixels: rows [top, top + height), columns [left, left + width)."""

    top: int
    left: int
    height: int
    width: int

    @property
    def rows(self) -> slice:
        return slice(self.top, self.top + self.height)

    @property
    def cols(self) -> slice:
        return slice(self.left, self.left + self.width)


def _span(lo: int, hi: int, side: int, extent: int) -> tuple[int, int]:
    """(start, length) of a `side`-long span centred on [lo, hi), shifted (not cut) to lie in [0, extent)."""
    length = min(side, extent)
    start = min(max((lo + hi - length) // 2, 0), extent - length)
    return start, length


def crop_box(slices: np.ndarray | Sequence[np.ndarray], mode: str) -> Box:
    """THE crop box of one volume: uint8 slices (H, W, 3), stacked (N, H, W, 3) or listed (a loose slice: `[image]`).

    "none": the whole slice. "brain": the bounding box of the pixels above `BRAIN_THRESHOLD` in any channel of any
    slice (a grey background made black first, `remove_grey_background`), grown by `CROP_MARGIN` on each side and to
    a square (so resizing keeps the aspect ratio), then shifted into the image; a square larger than the image is cut
    to it. No such pixel (all background): the whole slice."""
    h, w = slices[0].shape[:2]
    if mode == "none":
        return Box(0, 0, h, w)
    if mode != "brain":
        raise ValueError(f"crop {mode!r} is not one of {CROPS}")
    background = grey_background(slices)
    brain = np.zeros((h, w), bool)
    for image in slices:  # one slice at a time: no (N, H, W, 3) boolean temporary
        brain |= (remove_grey_background(np.asarray(image), background) > BRAIN_THRESHOLD).any(axis=-1)
    rows, cols = np.flatnonzero(brain.any(axis=1)), np.flatnonzero(brain.any(axis=0))
    if not rows.size:
        return Box(0, 0, h, w)
    side = max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 + 2 * CROP_MARGIN
    top, height = _span(int(rows[0]), int(rows[-1]) + 1, int(side), h)
    left, width = _span(int(cols[0]), int(cols[-1]) + 1, int(side), w)
    return Box(top, left, height, width)


def crop(images: np.ndarray, box: Box) -> np.ndarray:
    """uint8 (N, H, W, 3) -> (N, box.height, box.width, 3), contiguous (PIL reads it row by row)."""
    if box == (0, 0, *images.shape[1:3]):
        return images
    return np.ascontiguousarray(images[:, box.rows, box.cols])


def uncrop(resized: np.ndarray, box: Box, shape: tuple[int, int]) -> np.ndarray:
    """An array already at the box's size placed at the box in zeros of `shape` (H, W)."""
    if box == (0, 0, *shape):
        return resized
    out = np.zeros(tuple(shape) + resized.shape[2:], resized.dtype)
    out[box.rows, box.cols] = resized
    return out


def _resize_map(values: np.ndarray, box: Box) -> np.ndarray:
    """float (S, S) -> float32 (box.height, box.width), bilinear."""
    resized = Image.fromarray(np.asarray(values, np.float32)).resize((box.width, box.height), Image.BILINEAR)
    return np.asarray(resized)


def uncrop_probabilities(probabilities: np.ndarray, box: Box, shape: tuple[int, int]) -> np.ndarray:
    """A float (S, S) map at the model's size (probabilities, Grad-CAM) -> float32 `shape` (the input's H, W): resized
    to the box (bilinear) and pasted into zeros."""
    return uncrop(_resize_map(probabilities, box), box, tuple(shape))


def mask_at_input_size(probabilities: np.ndarray, threshold: float, box: Box, shape: tuple[int, int]) -> np.ndarray:
    """THE way back: a (S, S) probability map at the model's size -> the bool mask at `shape` (the input's H, W),
    empty outside the box. The probabilities are resized first and thresholded after, so the outline is drawn at
    the input's resolution instead of in blocks of the model's pixels (nnU-Net resamples probabilities, not labels;
    out of fold it beat resizing a thresholded mask, the model card's levers)."""
    return uncrop(_resize_map(probabilities, box) >= threshold, box, tuple(shape))


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


MASK_TARGET_DTYPES = {"nearest": np.dtype(bool), "area": np.dtype(np.float16)}  # what `mask_targets` returns per mode


def mask_targets(mask: np.ndarray, shape: tuple[int, int], mode: str = "nearest") -> np.ndarray:
    """A bool (H, W) mask as training targets at `shape` (h, w): "nearest", bool (`resize_mask`); "area", float16
    coverage, the share of each target pixel the mask covers (PIL's box filter, centred like `resize_images`), so a
    target's outline is neither shifted nor rounded to whole target pixels (DataConfig.mask_resize)."""
    if mode == "nearest":
        return resize_mask(mask, shape)
    if mode not in MASK_TARGET_DTYPES:
        raise ValueError(f"unknown mask resize {mode!r}; expected 'nearest' or 'area'")
    h, w = shape
    coverage = Image.fromarray(np.asarray(mask, np.float32)).resize((w, h), Image.BOX)
    return np.clip(np.asarray(coverage), 0.0, 1.0).astype(MASK_TARGET_DTYPES[mode])


def volume_stats(images: np.ndarray) -> Stats:
    """Per-channel mean and std over a whole (N, S, S, 3) stack: the volume_zscore statistics of one patient."""
    x = images.astype(np.float64)
    return x.mean(axis=(0, 1, 2)).astype(np.float32), x.std(axis=(0, 1, 2)).astype(np.float32)


def normalise(images: np.ndarray, spec: Preprocessing, stats: Stats | None = None) -> np.ndarray:
    """(N, S, S, 3) pixel values in [0, 255] -> float32 model input.

    `stats` overrides the volume_zscore statistics (the pipeline passes the patient's, precomputed once).
    A context stack (N, S, S, 3m) from `stack_context` is normalised slice by slice, each as it would be alone (with
    volume_zscore, all by the volume's statistics: `stats`, else those of its centre slices).
    """
    c = images.shape[-1]
    if c == CHANNELS:
        return _normalise(images, spec, stats)
    if c % CHANNELS:
        raise ValueError(f"expected 3 channels per slice, got {c}")
    n, h, w, m = *images.shape[:3], c // CHANNELS
    if stats is None and spec.normalisation == "volume_zscore":
        centre = m // 2 * CHANNELS
        stats = volume_stats(images[..., centre : centre + CHANNELS])
    slices = images.reshape(n, h, w, m, CHANNELS).transpose(3, 0, 1, 2, 4).reshape(m * n, h, w, CHANNELS)
    out = _normalise(slices, spec, stats)
    return out.reshape(m, n, h, w, CHANNELS).transpose(1, 2, 3, 0, 4).reshape(n, h, w, c)


def _normalise(images: np.ndarray, spec: Preprocessing, stats: Stats | None) -> np.ndarray:
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


def stack_context(volume: np.ndarray, k: int) -> np.ndarray:
    """THE neighbour rule of 2.5D input: (D, ..., C) slices in volume order -> (D, ..., C(2k+1)), row i holding rows
    i-k, ..., i, ..., i+k concatenated on the last axis in that order. Past either end of the volume the nearest row
    repeats (edge replication), so a lone slice (D = 1) is its own neighbours. k = 0 returns `volume` itself.

    Also picks rows: `stack_context(positions[:, None], k)` is each slice's (2k+1) neighbour positions."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"context slices must be a whole number >= 0, got {k!r}")
    if k == 0:
        return volume
    volume = np.asarray(volume)
    rows = np.clip(np.arange(len(volume))[:, None] + np.arange(-k, k + 1), 0, max(len(volume) - 1, 0))
    return np.concatenate([volume[rows[:, j]] for j in range(2 * k + 1)], axis=-1)


def preprocess(images: np.ndarray, spec: Preprocessing, stats: Stats | None = None, box: Box | None = None
               ) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float32 (N, S, S, spec.channels): a grey background made black
    (`remove_grey_background`), crop to `box` (default: `crop_box` of the stack as spec.crop says), bilinear resize to
    spec.image_size, normalise, then (spec.context_slices K > 0) stack each slice with its K neighbours on each side
    (`stack_context`).

    The background, volume_zscore and the brain crop are decided over the whole N stack, and the context takes the
    stack's slices as neighbours, so pass a patient's full volume in slice order (or its `stats` and `box`). Map masks
    back with `mask_at_input_size` and the same box.
    """
    images = remove_grey_background(images)
    box = crop_box(images, spec.crop) if box is None else box
    x = normalise(resize_images(crop(images, box), spec.image_size), spec, stats)
    return stack_context(x, spec.context_slices)

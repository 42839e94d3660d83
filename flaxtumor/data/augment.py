"""Training augmentation after Buda et al. (2019): rotation, scaling and horizontal flip, plus mild intensity jitter;
and, as an option, missing MRI sequences (`drop_sequences`).

One affine map moves image and mask together (bilinear for the image; for the mask nearest-neighbour, so a binary mask
stays binary, or bilinear for coverage targets, `DataConfig.mask_resize` "area", which stay soft). A 2.5D image (the
slice and its neighbours, 3 channels each) moves as one: the same map for every channel, and each MRI sequence's
jitter the same in every slice. Pure numpy/scipy: it runs inside grain worker processes.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from flaxtumor.config import DataConfig
from flaxtumor.data.preprocess import FLAIR, POST_CONTRAST, PRE_CONTRAST


def _affine(shape: tuple[int, int], degrees: float, scale: float, flip: bool) -> tuple[np.ndarray, np.ndarray]:
    """Output->input (row, col) map about the image centre: the form scipy's affine_transform wants."""
    theta = np.deg2rad(degrees)
    rotate = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    mirror = np.diag([1.0, -1.0 if flip else 1.0])
    matrix = mirror @ rotate / scale
    centre = (np.array(shape, np.float64) - 1) / 2
    return matrix, centre - matrix @ centre


def augment(
    image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, cfg: DataConfig
) -> tuple[np.ndarray, np.ndarray]:
    """image float32 (S, S, 3m) in pixel units [0, 255] (before `normalise`): one slice (m = 1) or a context stack of m
    slices, 3 channels each; mask float32 (S, S, 1) in [0, 1] (the centre slice's: binary, or coverage).

    Returns the same shapes and dtypes. All randomness comes from `rng`, so a (seed, epoch, index) rng reproduces it.
    """
    degrees = rng.uniform(-cfg.rotate_degrees, cfg.rotate_degrees)
    scale = rng.uniform(*cfg.scale_range)
    flip = bool(rng.random() < cfg.flip_probability)
    # Per-channel gamma survives z-scoring (a plain gain/offset would be normalised away);
    # the global gain matters for the imagenet/caffe normalisations.
    gamma = np.exp(rng.uniform(-cfg.intensity_jitter, cfg.intensity_jitter, size=3)).astype(np.float32)
    gamma = np.tile(gamma, image.shape[-1] // 3)  # per sequence, so a neighbour's FLAIR is jittered as the centre's
    gain = np.float32(rng.uniform(1 - cfg.intensity_jitter, 1 + cfg.intensity_jitter))

    matrix, offset = _affine(image.shape[:2], degrees, scale, flip)
    # Background outside the head is black in every channel, so new border pixels are filled with 0.
    image = np.stack(
        [ndimage.affine_transform(image[..., c], matrix, offset, order=1, mode="constant", cval=0.0)
         for c in range(image.shape[-1])],
        axis=-1,
    )
    order = 1 if cfg.mask_resize == "area" else 0
    mask = ndimage.affine_transform(mask[..., 0], matrix, offset, order=order, mode="constant", cval=0.0)[..., None]

    image = 255.0 * (np.clip(image, 0.0, 255.0) / 255.0) ** gamma * gain
    return np.clip(image, 0.0, 255.0).astype(np.float32), mask.astype(np.float32)


def patch_window(mask: np.ndarray, size: int, rng: np.random.Generator) -> tuple[int, int]:
    """Top-left (row, col) of a `size` x `size` training patch of a slice whose (S, S, 1) mask is given: a window
    around a random tumour pixel when the slice has tumour (so the sampler's tumour weighting still shows the model
    tumour), anywhere otherwise. Every window that holds the chosen pixel is equally likely; it never leaves the
    slice."""
    height, width = mask.shape[:2]
    if size > min(height, width):
        raise ValueError(f"a {size}x{size} patch does not fit a {height}x{width} slice")
    tumour = np.argwhere(mask[..., 0] > 0)
    if not len(tumour):
        return int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))
    row, col = tumour[rng.integers(len(tumour))]
    # Windows [top, top + size) that contain `row` and fit: top in [row - size + 1, row], clipped to [0, height - size].
    top = rng.integers(max(0, row - size + 1), min(row, height - size) + 1)
    left = rng.integers(max(0, col - size + 1), min(col, width - size) + 1)
    return int(top), int(left)


FILLED = (PRE_CONTRAST, POST_CONTRAST)  # the sequences kaggle_3m fills with FLAIR when a patient lacks them


def drop_sequences(image: np.ndarray, p: float, rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, ...]]:
    """kaggle_3m stores a sequence a patient lacks as a copy of FLAIR: 9 of the 81 patients here lack post-contrast
    or both contrasts, and a model trained without such examples scores lower on them. This makes them: with
    probability `p` the example lacks pre-contrast, post-contrast or both (equally likely), each replaced by FLAIR in
    every slice of a context stack alike (a sequence is missing for the whole volume).

    image (S, S, 3m) in any units; returns (image, the replaced channel indices within a slice's 3)."""
    patterns = ((FILLED[0],), (FILLED[1],), FILLED)
    dropped = patterns[rng.integers(len(patterns))] if rng.random() < p else ()
    return fill_with_flair(image, dropped), dropped


def fill_with_flair(image: np.ndarray, sequences: tuple[int, ...] = FILLED) -> np.ndarray:
    """`image` (..., 3m) with the given sequences (channel indices within each slice's 3) replaced by that slice's
    FLAIR, as kaggle_3m stores a patient that lacks them; by default both contrasts (a FLAIR-only patient)."""
    if not sequences:
        return image
    image = image.copy()
    for c in sequences:
        image[..., c::3] = image[..., FLAIR::3]
    return image

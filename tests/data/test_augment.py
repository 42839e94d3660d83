"""Augmentation: image and mask move together, the mask stays binary, and the rng alone decides the result."""

import numpy as np

from flaxtumor.config import DataConfig
from flaxtumor.data.augment import augment


def _blob(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size]
    mask = ((yy - 20) ** 2 / 64 + (xx - 40) ** 2 / 144 < 1).astype(np.float32)[..., None]
    image = np.zeros((size, size, 3), np.float32)
    image[..., 0] = mask[..., 0] * 255  # channel 0 IS the mask: any misalignment shows
    image[..., 1] = xx * 3.0
    return image, mask


def test_mask_stays_binary_and_aligned() -> None:
    image, mask = _blob()
    cfg = DataConfig(rotate_degrees=15, scale_range=(0.9, 1.1), flip_probability=0.5, intensity_jitter=0.0)
    for k in range(20):
        out_image, out_mask = augment(image, mask, np.random.default_rng(k), cfg)
        assert out_image.shape == image.shape and out_mask.shape == mask.shape
        assert out_image.dtype == out_mask.dtype == np.float32
        assert set(np.unique(out_mask)) <= {0.0, 1.0} and out_mask.sum() > 0
        # Pixels well inside/outside the moved image blob agree with the moved mask (edges are interpolated).
        inside, outside = out_image[..., 0] > 200, out_image[..., 0] < 55
        assert out_mask[inside, 0].min() == 1 and out_mask[outside, 0].max() == 0
        assert (inside | outside).mean() > 0.97


def test_flip_and_rotation_happen() -> None:
    image, mask = _blob()
    cfg = DataConfig(rotate_degrees=0, scale_range=(1.0, 1.0), flip_probability=1.0, intensity_jitter=0.0)
    out_image, out_mask = augment(image, mask, np.random.default_rng(0), cfg)
    assert np.array_equal(out_mask, mask[:, ::-1]) and np.allclose(out_image, image[:, ::-1], atol=1e-3)
    rotated = augment(image, mask, np.random.default_rng(0), DataConfig(rotate_degrees=15, flip_probability=0))[1]
    assert not np.array_equal(rotated, mask)


def test_reproducible_per_rng_and_jitter_is_mild() -> None:
    image, mask = _blob()
    image[..., 2] = 100.0
    cfg = DataConfig(intensity_jitter=0.1)
    a = augment(image, mask, np.random.default_rng([0, 1, 2]), cfg)
    b = augment(image, mask, np.random.default_rng([0, 1, 2]), cfg)
    c = augment(image, mask, np.random.default_rng([0, 2, 2]), cfg)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])
    assert a[0].min() >= 0 and a[0].max() <= 255
    centre = a[0][28:36, 28:36, 2]
    assert np.all(np.abs(centre - 100.0) < 30)

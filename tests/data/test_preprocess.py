"""The one preprocessing function: sizes, dtypes and each normalisation's definition."""

import numpy as np
import pytest

from flaxtumor.data.preprocess import Preprocessing, preprocess, resize_mask


@pytest.fixture
def volume() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (4, 40, 40, 3), dtype=np.uint8)


def test_zscores(volume: np.ndarray) -> None:
    image = preprocess(volume, Preprocessing(20, "image_zscore"))
    assert image.shape == (4, 20, 20, 3) and image.dtype == np.float32
    np.testing.assert_allclose(image.mean(axis=(1, 2)), 0, atol=1e-4)
    np.testing.assert_allclose(image.std(axis=(1, 2)), 1, atol=1e-3)
    vol = preprocess(volume, Preprocessing(20, "volume_zscore"))
    np.testing.assert_allclose(vol.mean(axis=(0, 1, 2)), 0, atol=1e-4)
    np.testing.assert_allclose(vol.std(axis=(0, 1, 2)), 1, atol=1e-3)
    assert np.isfinite(preprocess(np.zeros((1, 8, 8, 3), np.uint8), Preprocessing(8, "image_zscore"))).all()


def test_imagenet_and_caffe(volume: np.ndarray) -> None:
    x = volume.astype(np.float32)
    imagenet = (x / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    np.testing.assert_allclose(preprocess(volume, Preprocessing(40, "imagenet")), imagenet, atol=1e-5)
    caffe = x[..., ::-1] - [103.939, 116.779, 123.68]  # BGR
    np.testing.assert_allclose(preprocess(volume, Preprocessing(40, "caffe")), caffe, atol=1e-4)


def test_spec_round_trip_and_validation() -> None:
    spec = Preprocessing(128, "volume_zscore")
    assert Preprocessing.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="normalisation"):
        Preprocessing(128, "minmax")


def test_resize_mask_is_nearest() -> None:
    mask = np.zeros((40, 40), bool)
    mask[10:30, 10:20] = True
    small = resize_mask(mask, (20, 20))
    assert small.dtype == bool and small.sum() == 50

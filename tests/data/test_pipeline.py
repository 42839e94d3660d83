"""Grain pipeline: batch shapes/dtypes, padding, determinism, exact resume, workers, and parity with `preprocess`."""

from pathlib import Path

import numpy as np
import pytest

from flaxtumor.config import DataConfig
from flaxtumor.data.io import DataError, read_image
from flaxtumor.data.lgg import Patient, discover
from flaxtumor.data.pipeline import eval_batches, steps_per_epoch, train_batches
from flaxtumor.data.preprocess import Preprocessing, preprocess
from flaxtumor.data.synthetic import write_synthetic_dataset

SIZE = 32


@pytest.fixture(scope="module")
def slices(synthetic_patients: list[Patient]) -> list:
    return [s for p in synthetic_patients[:3] for s in p.slices]  # 36 slices


def _cfg(**kw) -> DataConfig:
    return DataConfig(image_size=SIZE, **kw)


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_train_batch_shapes_and_dtypes(slices: list) -> None:
    batches = list(train_batches(slices, _cfg(), batch_size=8, seed=0, epoch=0))
    assert len(batches) == steps_per_epoch(36, 8) == 4  # drop_remainder
    for b in batches:
        assert b["image"].shape == (8, SIZE, SIZE, 3) and b["image"].dtype == np.float32
        assert b["mask"].shape == (8, SIZE, SIZE, 1) and b["mask"].dtype == np.float32
        assert b["label"].shape == (8,) and b["label"].dtype == np.float32
        assert b["valid"].dtype == bool and b["valid"].all()
        assert set(np.unique(b["mask"])) <= {0.0, 1.0} and set(np.unique(b["label"])) <= {0.0, 1.0}
        assert np.isfinite(b["image"]).all()


def test_deterministic_per_seed_and_epoch_and_exact_resume(slices: list) -> None:
    cfg = _cfg()
    epoch = list(train_batches(slices, cfg, 8, seed=0, epoch=1))
    assert _same(epoch, list(train_batches(slices, cfg, 8, seed=0, epoch=1)))
    assert not _same(epoch, list(train_batches(slices, cfg, 8, seed=0, epoch=2)))
    assert not _same(epoch, list(train_batches(slices, cfg, 8, seed=1, epoch=1)))
    assert _same(epoch[2:], list(train_batches(slices, cfg, 8, seed=0, epoch=1, start_step=2)))
    with pytest.raises(ValueError, match="start_step 9"):
        train_batches(slices, cfg, 8, seed=0, epoch=1, start_step=9)


def test_cache_and_workers_do_not_change_batches(slices: list) -> None:
    reference = list(train_batches(slices, _cfg(), 8, seed=3, epoch=0))
    assert _same(reference, list(train_batches(slices, _cfg(cache_decoded=False), 8, seed=3, epoch=0)))
    assert _same(reference, list(train_batches(slices, _cfg(num_workers=1), 8, seed=3, epoch=0)))


def test_eval_batches_in_order_with_padding(slices: list) -> None:
    batches = list(eval_batches(slices, _cfg(augment=True), batch_size=16))
    assert len(batches) == 3 and all(b["image"].shape == (16, SIZE, SIZE, 3) for b in batches)
    valid = np.concatenate([b["valid"] for b in batches])
    assert valid.sum() == 36 and not valid[36:].any()
    labels = np.concatenate([b["label"] for b in batches])[:36]
    assert np.array_equal(labels, [s.has_tumour for s in slices])
    assert not batches[-1]["image"][4:].any() and not batches[-1]["mask"][4:].any()


@pytest.mark.parametrize("normalisation", ["image_zscore", "volume_zscore", "imagenet", "caffe"])
def test_eval_equals_preprocess_of_the_volume(synthetic_patients: list[Patient], normalisation: str) -> None:
    patient = synthetic_patients[0]
    cfg = _cfg(normalisation=normalisation)
    images = np.concatenate([b["image"] for b in eval_batches(patient.slices, cfg, 12)])
    volume = np.stack([read_image(s.image_path) for s in patient.slices])
    np.testing.assert_allclose(images, preprocess(volume, Preprocessing(SIZE, normalisation)), atol=1e-5)


def test_too_few_slices(slices: list) -> None:
    with pytest.raises(ValueError, match="cannot fill one batch"):
        train_batches(slices[:3], _cfg(), 8, seed=0, epoch=0)


def test_corrupt_file_surfaces_as_data_error(tmp_path: Path) -> None:
    [patient] = discover(write_synthetic_dataset(tmp_path, n_patients=1, n_slices=4, seed=5))
    bad = patient.slices[2].image_path
    bad.write_bytes(bad.read_bytes()[:300])  # header intact, deflate stream truncated
    with pytest.raises(DataError, match=rf"^{bad}: unreadable or corrupt image"):
        list(train_batches(patient.slices, _cfg(cache_decoded=False), 2, seed=0, epoch=0))

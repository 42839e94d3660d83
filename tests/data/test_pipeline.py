"""Grain pipeline: batch shapes/dtypes, padding, determinism, exact resume, workers, per-process sharding, parity
with `preprocess`, and the brain crop (one box per patient, image and mask cut alike)."""

from pathlib import Path

import numpy as np
import pytest

from flaxtumor.config import DataConfig
from flaxtumor.data.io import DataError, read_image
from flaxtumor.data.lgg import Patient, discover
from flaxtumor.data import pipeline
from flaxtumor.data.pipeline import eval_batches, steps_per_epoch, train_batches
from flaxtumor.data.io import read_mask
from flaxtumor.data.preprocess import Preprocessing, crop_box, preprocess, resize_mask
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
    shard = list(train_batches(slices, _cfg(num_workers=1), 8, seed=3, epoch=0, shard_index=1, shard_count=2))
    assert _same([{k: v[4:] for k, v in b.items()} for b in reference], shard)


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


@pytest.mark.parametrize("normalisation", ["image_zscore", "volume_zscore"])
def test_brain_crop_cuts_image_and_mask_with_the_patients_one_box(synthetic_patients, normalisation) -> None:
    cfg = _cfg(normalisation=normalisation, crop="brain")
    volumes = [np.stack([read_image(s.image_path) for s in p.slices]) for p in synthetic_patients[:2]]
    boxes = [crop_box(v, "brain") for v in volumes]
    assert boxes[0] != (0, 0, 256, 256)  # this patient's head leaves a border to crop
    slices = [s for p in synthetic_patients[:2] for s in p.slices]
    readings = pipeline.patient_readings(slices, "brain")
    assert tuple(r.box for r in readings) == tuple(b for b, p in zip(boxes, synthetic_patients) for _ in p.slices)
    batches = list(eval_batches(slices, cfg, 8))
    images = np.concatenate([b["image"] for b in batches])[: len(slices)]
    masks = np.concatenate([b["mask"] for b in batches])[: len(slices), ..., 0] > 0.5
    spec = Preprocessing(SIZE, normalisation, crop="brain")
    expected = np.concatenate([preprocess(v, spec) for v in volumes])
    np.testing.assert_allclose(images, expected, atol=1e-5)
    truth = [resize_mask(read_mask(s.mask_path)[b.rows, b.cols], (SIZE, SIZE))
             for p, b in zip(synthetic_patients[:2], boxes) for s in p.slices]
    assert any(t.any() for t in truth) and np.array_equal(masks, np.stack(truth))
    # Training batches read the same cropped slices (augmentation off: exactly the eval rows, shuffled).
    train = list(train_batches(slices, _cfg(normalisation=normalisation, crop="brain", augment=False), 8, 0, 0))
    for b in train:
        for row, i in enumerate(b["index"]):
            np.testing.assert_allclose(b["image"][row], images[i], atol=1e-5)
            assert np.array_equal(b["mask"][row, ..., 0] > 0.5, masks[i])


def test_area_masks_are_the_coverage_of_each_slice_in_eval_and_soft_in_training(slices: list) -> None:
    """data.mask_resize "area": eval targets are exactly `mask_targets` of each slice (and the cache keeps them apart
    from the binary ones); training targets stay in [0, 1], soft at the outlines, after augmentation."""
    from flaxtumor.data.preprocess import mask_targets

    binary = np.concatenate([b["mask"] for b in eval_batches(slices, _cfg(), 16)])[: len(slices), ..., 0]
    area = np.concatenate([b["mask"] for b in eval_batches(slices, _cfg(mask_resize="area"), 16)])[: len(slices), ..., 0]
    expected = np.stack([mask_targets(read_mask(s.mask_path), (SIZE, SIZE), "area") for s in slices])
    np.testing.assert_array_equal(area, expected.astype(np.float32))
    assert set(np.unique(binary)) == {0.0, 1.0} and 0 < ((area > 0) & (area < 1)).mean()
    train = np.concatenate([b["mask"] for b in train_batches(slices, _cfg(mask_resize="area"), 8, seed=0, epoch=0)])
    assert train.min() >= 0 and train.max() <= 1 and ((train > 0.05) & (train < 0.95)).any()


def test_too_few_slices(slices: list) -> None:
    with pytest.raises(ValueError, match="cannot fill one batch"):
        train_batches(slices[:3], _cfg(), 8, seed=0, epoch=0)


def test_corrupt_file_surfaces_as_data_error(tmp_path: Path) -> None:
    [patient] = discover(write_synthetic_dataset(tmp_path, n_patients=1, n_slices=4, seed=5))
    bad = patient.slices[2].image_path
    bad.write_bytes(bad.read_bytes()[:300])  # header intact, deflate stream truncated
    with pytest.raises(DataError, match=rf"^{bad}: unreadable or corrupt image"):
        list(train_batches(patient.slices, _cfg(cache_decoded=False), 2, seed=0, epoch=0))


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list:
    """Image paths decoded from disk (every decode goes through `_load`), with an empty decoded-slice cache."""
    seen: list = []
    load = pipeline._load

    def counting(s, size, reading=pipeline.Reading(), mask_resize="nearest"):
        seen.append(s.image_path)
        return load(s, size, reading, mask_resize)

    monkeypatch.setattr(pipeline, "_load", counting)
    monkeypatch.setattr(pipeline, "_memo", {})
    return seen


def _cached() -> int:
    """Slices in the decoded cache(s)."""
    return sum(int(v.filled.sum()) for v in pipeline._memo.values() if isinstance(v, pipeline._DecodedCache))


@pytest.mark.parametrize("cache", [True, False])
def test_train_shards_are_blocks_of_the_global_batch_and_read_only_their_rows(slices, reads, cache) -> None:
    cfg = _cfg(augment=True, cache_decoded=cache)
    whole = list(train_batches(slices, cfg, 8, seed=2, epoch=1, start_step=1))  # 3 of 4 steps: exact resume too
    assert len(whole) == 3 and len(reads) == 24 == len(set(reads))
    epoch_reads, shard_reads, shards = set(reads), [], []
    for i in range(2):
        reads.clear()
        pipeline._memo.clear()
        shards.append(list(train_batches(slices, cfg, 8, seed=2, epoch=1, start_step=1, shard_index=i, shard_count=2)))
        assert len(reads) == 12 == len(set(reads))  # its 4 rows of each of the 3 steps, each decoded once
        assert _cached() == (12 if cache else 0)
        shard_reads.append(set(reads))
    assert not shard_reads[0] & shard_reads[1] and shard_reads[0] | shard_reads[1] == epoch_reads
    for t, batch in enumerate(whole):  # same shuffle, same augmentation per example: the shards in order are the batch
        for k, v in batch.items():
            assert shards[0][t][k].shape[0] == shards[1][t][k].shape[0] == 4
            np.testing.assert_array_equal(np.concatenate([shards[0][t][k], shards[1][t][k]]), v, err_msg=k)


@pytest.mark.parametrize("cache", [True, False])
def test_eval_shards_are_blocks_of_the_padded_global_batch(slices, reads, cache) -> None:
    cfg = _cfg(cache_decoded=cache)
    whole = list(eval_batches(slices, cfg, 16))  # 36 slices: 16 + 16 + 4 real rows
    assert len(reads) == 36
    shards, counts = [], []
    for i in range(2):
        reads.clear()
        pipeline._memo.clear()
        shards.append(list(eval_batches(slices, cfg, 16, shard_index=i, shard_count=2)))
        counts.append(len(reads))
        assert _cached() == (counts[-1] if cache else 0)
    # Shard 0 holds rows 0-7 of each batch (the last: 4 slices + 4 padding), shard 1 rows 8-15 (the last: all padding).
    assert counts == [20, 16] and [len(s) for s in shards] == [3, 3]
    assert [b["valid"].sum() for b in shards[1]] == [8, 8, 0]
    for t, batch in enumerate(whole):
        for k, v in batch.items():
            joined = np.concatenate([shards[0][t][k], shards[1][t][k]])
            assert joined.dtype == v.dtype
            np.testing.assert_array_equal(joined, v, err_msg=k)


def test_bad_shards(slices: list) -> None:
    with pytest.raises(ValueError, match="batch size 8 does not divide into 3 shards"):
        train_batches(slices, _cfg(), 8, seed=0, epoch=0, shard_index=0, shard_count=3)
    with pytest.raises(ValueError, match="shard_index 2 is outside the 2 shard"):
        list(eval_batches(slices, _cfg(), 8, shard_index=2, shard_count=2))


# -- tumour-aware sampling ---------------------------------------------------------------------------------------------


def _areas(slices: list) -> np.ndarray:
    """Tumour pixels per slice, counted here independently of the pipeline."""
    from flaxtumor.data.io import read_mask

    return np.array([read_mask(s.mask_path).sum() for s in slices], np.float64)


def test_sampling_probabilities_are_area_plus_uniform_share(slices: list) -> None:
    areas = _areas(slices)
    assert 0 < (areas > 0).sum() < len(slices)  # the fixture has tumour and tumour-free slices
    for u in (0.0, 0.1, 0.5, 1.0):
        p = pipeline.sampling_probabilities(slices, _cfg(sampling="tumour", sampling_uniform_share=u))
        np.testing.assert_allclose(p, (1 - u) * areas / areas.sum() + u / len(slices), rtol=1e-12)
    empty = [s for s, a in zip(slices, areas) if a == 0]
    np.testing.assert_allclose(pipeline.sampling_probabilities(empty, _cfg(sampling="tumour")), 1 / len(empty))
    with pytest.raises(ValueError, match="sampling_uniform_share"):
        pipeline.sampling_probabilities(slices, _cfg(sampling="tumour", sampling_uniform_share=1.5))


def test_epoch_length_defaults_to_twice_the_tumour_slices(slices: list) -> None:
    tumour = sum(s.has_tumour for s in slices)
    assert pipeline.epoch_length(slices, _cfg()) == len(slices)
    assert pipeline.epoch_length(slices, _cfg(sampling="tumour")) == 2 * tumour
    assert pipeline.epoch_length(slices, _cfg(sampling="tumour", samples_per_epoch=40)) == 40
    batches = list(train_batches(slices, _cfg(sampling="tumour", samples_per_epoch=40), 8, seed=0, epoch=0))
    assert len(batches) == 5


def test_tumour_sampling_draws_in_proportion_to_area(slices: list) -> None:
    areas = _areas(slices)
    cfg = _cfg(sampling="tumour", sampling_uniform_share=0.0, samples_per_epoch=20000)
    picks = np.array(list(pipeline.epoch_order(slices, cfg, seed=0, epoch=0)))
    assert len(picks) == 20000 and set(picks) == set(np.flatnonzero(areas))  # u = 0: never an empty slice
    counts = np.bincount(picks, minlength=len(slices))
    expected = 20000 * areas / areas.sum()
    assert np.abs(counts - expected).max() < 5 * np.sqrt(expected.max())  # within 5 sigma of the binomial spread
    cfg = _cfg(sampling="tumour", sampling_uniform_share=0.5, samples_per_epoch=20000)
    picks = np.array(list(pipeline.epoch_order(slices, cfg, seed=0, epoch=0)))
    empty_share = np.isin(picks, np.flatnonzero(areas == 0)).mean()
    assert empty_share == pytest.approx(0.5 * (areas == 0).mean(), abs=0.02)


def test_tumour_sampling_is_deterministic_resumable_and_shards(slices: list) -> None:
    cfg = _cfg(sampling="tumour", augment=True)
    epoch = list(train_batches(slices, cfg, 8, seed=0, epoch=1))
    assert len(epoch) == steps_per_epoch(pipeline.epoch_length(slices, cfg), 8)
    assert _same(epoch, list(train_batches(slices, cfg, 8, seed=0, epoch=1)))
    assert not _same(epoch, list(train_batches(slices, cfg, 8, seed=0, epoch=2)))
    assert not _same(epoch, list(train_batches(slices, cfg, 8, seed=1, epoch=1)))
    assert _same(epoch[2:], list(train_batches(slices, cfg, 8, seed=0, epoch=1, start_step=2)))
    shards = [list(train_batches(slices, cfg, 8, seed=0, epoch=1, start_step=1, shard_index=i, shard_count=2))
              for i in range(2)]
    for t, batch in enumerate(epoch[1:]):
        for k, v in batch.items():
            np.testing.assert_array_equal(np.concatenate([shards[0][t][k], shards[1][t][k]]), v, err_msg=k)
    # More tumour than a shuffled epoch: the sampler favours tumour slices.
    labels = np.concatenate([b["label"] for b in epoch])
    assert labels.mean() > np.mean([s.has_tumour for s in slices])

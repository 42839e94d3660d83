"""Segmenter training in patches (`--train-patch P`, issue 11): the window rule (inside the slice, around a tumour
pixel when there is one, every such window possible), the pipeline's patch batches (the whole slice's normalisation,
image and mask cut alike, evaluation untouched), the config's errors, and a tiny patch-trained segmenter that
validates and serves whole slices."""

import numpy as np
import pytest

from flaxtumor.checkpoints import load_inference
from flaxtumor.config import Config
from flaxtumor.data.augment import patch_window
from flaxtumor.data.lgg import load_dataset
from flaxtumor.data.pipeline import eval_batches, train_batches
from flaxtumor.train import loop
from flaxtumor.train.cli import main as train_main
from tests.train.helpers import tiny_config


def _mask(size: int, rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros((size, size, 1), np.float32)
    mask[rows, cols] = 1.0
    return mask


def test_a_tumour_slice_patch_always_holds_tumour_and_every_holding_window_occurs():
    mask = _mask(32, slice(3, 4), slice(30, 31))  # one tumour pixel near a corner
    rng = np.random.default_rng(0)
    corners = {patch_window(mask, 8, rng) for _ in range(2000)}
    # Windows of 8 holding row 3 and column 30 that fit in 32: top 0..3 (not below 0), left 23..24 (not past 32 - 8).
    assert corners == {(top, left) for top in range(4) for left in (23, 24)}
    for top, left in corners:
        assert mask[top:top + 8, left:left + 8].any()


def test_an_empty_slice_patch_lands_anywhere_inside():
    rng = np.random.default_rng(1)
    corners = np.array([patch_window(np.zeros((32, 32, 1), np.float32), 16, rng) for _ in range(3000)])
    assert corners.min() == 0 and corners.max() == 16  # both edges reached, never past them
    assert len({tuple(c) for c in corners}) > 200  # spread over the 17 x 17 possible corners
    assert patch_window(np.zeros((8, 8, 1)), 8, rng) == (0, 0)
    with pytest.raises(ValueError, match="does not fit"):
        patch_window(np.zeros((8, 8, 1)), 16, rng)


def test_train_batches_are_patches_of_the_normalised_whole_slice_and_eval_batches_whole_slices(tmp_path):
    whole = tiny_config(tmp_path, "seg", **{"data.sampling": "tumour", "data.samples_per_epoch": 16})
    patched = whole.override(**{"data.train_patch": 16})
    slices = [s for p in load_dataset(whole.data) for s in p.slices]
    full = next(train_batches(slices, whole.data, 8, seed=3, epoch=0))
    cut = next(train_batches(slices, patched.data, 8, seed=3, epoch=0))
    assert cut["image"].shape == (8, 16, 16, 3) and cut["mask"].shape == (8, 16, 16, 1)
    assert np.array_equal(cut["index"], full["index"])  # the same slices, drawn by the same sampler
    for k in range(8):  # each patch is a window of its whole (normalised) slice, image and mask cut alike
        hits = [(r, c) for r in range(17) for c in range(17)
                if np.array_equal(full["image"][k, r:r + 16, c:c + 16], cut["image"][k])]
        assert hits and any(np.array_equal(full["mask"][k, r:r + 16, c:c + 16], cut["mask"][k]) for r, c in hits)
        assert cut["mask"][k].any() == full["mask"][k].any()  # a tumour slice's patch holds tumour
    again = next(train_batches(slices, patched.data, 8, seed=3, epoch=0))
    assert np.array_equal(again["image"], cut["image"])  # a function of (seed, epoch, position): resumable
    evaluation = next(eval_batches(slices, patched.data, 8))
    assert evaluation["image"].shape == (8, 32, 32, 3)


@pytest.mark.parametrize("widths, overrides, message", [
    ((4, 8, 16), {"data.train_patch": 64}, "from 0"),
    ((4, 8, 16), {"data.train_patch": -16}, "from 0"),
    ((4, 8, 16, 32), {"data.train_patch": 12}, "multiple of 8"),  # halves three times
    ((4, 8, 16), {"data.train_patch": 16, "train.task": "cls"}, "segmenter lever"),
])
def test_config_refuses_patches_that_cannot_work(tmp_path, widths, overrides, message):
    base = tiny_config(tmp_path, "seg", **{"model.resunet_widths": widths})
    with pytest.raises(ValueError, match=message):
        base.override(**overrides)


def test_cli_sets_the_patch(tmp_path):
    assert train_main(["--task", "seg", "--data", "synthetic", "--image-size", "32", "--train-patch", "48",
                       "--out", str(tmp_path / "run"), "--epochs", "1"]) == 2  # larger than the slice: an error


def test_a_patch_trained_segmenter_validates_and_serves_whole_slices(tmp_path):
    from flaxtumor.inference import Pipeline

    cfg = tiny_config(tmp_path, "seg", **{"train.epochs": 1, "data.train_patch": 16})
    summary = loop.run(cfg)
    assert np.isfinite(summary["history"][0]["train_loss"])
    assert np.isfinite(summary["history"][0]["val_volumetric_dice"])
    model, metadata = load_inference(summary["checkpoint"])
    assert metadata["preprocessing"]["image_size"] == 32 and metadata["config"]["data"]["train_patch"] == 16
    pipeline = Pipeline(model, model, metadata, metadata)
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8)
    [mask] = pipeline.segment([image], point=pipeline.point.override(mask_threshold=0.0))
    assert mask.shape == (32, 32) and mask.all()
    assert Config.from_dict(metadata["config"]).data.train_patch == 16

"""Pipeline with a brain-cropping checkpoint: masks come back at the input size, inside the crop box only; old metadata
(no crop recorded) loads as "none" and serves exactly as before the crop existed."""

import json
import shutil

import jax
import numpy as np
import pytest

from flaxtumor.checkpoints import load_inference, read_metadata
from flaxtumor.data.preprocess import (
    Box, Preprocessing, crop_box, mask_at_input_size, normalise, resize_images,
)
from flaxtumor.inference import Pipeline
from tests.fixtures_checkpoints import IMAGE_SIZE, export_tiny, tiny  # noqa: F401  (session fixture)


def _disc(shape, centre, radius, value=150):
    """uint8 (H, W, 3): textured disc (the "head") on black."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    inside = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2
    noise = np.random.default_rng(centre[0] * 1000 + centre[1]).integers(0, 60, (*shape, 3))
    return np.where(inside[..., None], value + noise, 0).astype(np.uint8)


def _box_mask(box, shape):
    mask = np.zeros(shape, bool)
    mask[box.rows, box.cols] = True
    return mask


@pytest.fixture(scope="module")
def cropping(tmp_path_factory, tiny):  # noqa: F811
    """The tiny classifier, and a segmenter that crops to the brain with mask threshold 0 (its mask is its whole
    input, so the box is visible in every mask)."""
    root = tmp_path_factory.mktemp("crop")
    shutil.copytree(tiny.checkpoints / "classifier", root / "classifier")
    split = read_metadata(tiny.checkpoints / "segmenter").split
    export_tiny(root / "segmenter", "seg", "volume_zscore", 0.0, split, crop="brain")
    return root


def test_loose_slices_each_get_their_own_box_and_masks_at_the_input_size(cropping):
    pipeline = Pipeline.from_checkpoints(cropping, threshold=0.0)  # the gate passes every slice
    assert pipeline.segmenter_spec.crop == "brain" and pipeline.classifier_spec.crop == "none"
    images = [_disc((96, 96), (40, 50), 20), _disc((70, 130), (35, 100), 15), np.zeros((48, 40, 3), np.uint8)]
    for image, pred in zip(images, pipeline.predict_slices(images)):
        box = crop_box([image], "brain")
        assert pred.mask.shape == image.shape[:2]
        np.testing.assert_array_equal(pred.mask, _box_mask(box, image.shape[:2]))  # the box, nothing outside
    assert pipeline.predict_slices(images[2:])[0].mask.all()  # all background: the whole slice


def test_a_volume_has_one_box_for_all_its_slices(cropping):
    pipeline = Pipeline.from_checkpoints(cropping, threshold=0.0, postprocess="none")
    volume = [_disc((80, 80), (30, 30), 12), _disc((80, 80), (50, 45), 12), np.zeros((80, 80, 3), np.uint8)]
    box = crop_box(volume, "brain")
    assert box.height == box.width < 80
    expected = _box_mask(box, (80, 80))
    for masks in ([p.mask for p in pipeline.predict_volume(volume)], pipeline.segment(volume, volume=True)):
        assert all(np.array_equal(m, expected) for m in masks)


def test_metadata_without_crop_loads_as_none_and_serves_as_before(tiny, tmp_path):  # noqa: F811
    # A checkpoint written before the crop existed: neither its preprocessing nor its config mention it.
    old = tmp_path / "checkpoints"
    shutil.copytree(tiny.checkpoints, old)
    meta_file = old / "segmenter" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    meta["preprocessing"].pop("crop", None)
    del meta["config"]["data"]["crop"]
    meta_file.write_text(json.dumps(meta))
    spec = read_metadata(old / "segmenter").preprocessing
    assert spec == Preprocessing(IMAGE_SIZE, "volume_zscore", "none")

    pipeline = Pipeline.from_checkpoints(old, mask_threshold=0.5)
    volume = [_disc((64, 64), (30, 34), 18)] * 2 + [_disc((64, 64), (20, 20), 8)]
    # Before the crop: the whole slices resized, normalised, the masks resized back.
    model, _ = load_inference(old / "segmenter")
    x = normalise(resize_images(np.stack(volume), IMAGE_SIZE), spec)
    probs = np.asarray(jax.nn.sigmoid(model(x)))[..., 0]
    before = [mask_at_input_size(p, 0.5, Box(0, 0, 64, 64), (64, 64)) for p in probs]
    after = pipeline.segment(volume, volume=True)
    assert any(m.any() for m in before) and not all(m.all() for m in before)  # a mask worth comparing
    assert all(np.array_equal(a, b) for a, b in zip(after, before))


def test_gradcam_of_a_cropping_classifier_is_zero_outside_its_box(cropping, tmp_path):
    root = tmp_path / "checkpoints"
    shutil.copytree(cropping / "segmenter", root / "segmenter")
    export_tiny(root / "classifier", "cls", "image_zscore", 0.5, read_metadata(cropping / "segmenter").split,
                crop="brain")
    pipeline = Pipeline.from_checkpoints(root)
    image = _disc((90, 90), (40, 40), 15)
    box = crop_box([image], "brain")
    heat = pipeline.gradcam(image)
    assert heat.shape == (90, 90) and not heat[~_box_mask(box, (90, 90))].any()

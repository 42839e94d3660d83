"""2.5D input (`--context-slices K`, issue 11): the one neighbour rule (`stack_context`) and its known answers, the
spec in checkpoint metadata, per-slice normalisation of a stack, the Grain pipeline's neighbours, augmentation of a
stack as one, the model's input channels, config errors, and a tiny trained 2.5D segmenter served by `Pipeline`
(volumes; lone slices warn) and predicted out of fold (oof.predict_fold), all from the same inputs."""

import dataclasses
import json
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from flaxtumor import oof
from flaxtumor.checkpoints import load_inference
from flaxtumor.config import Config, DataConfig, ModelConfig
from flaxtumor.data import pipeline
from flaxtumor.data.augment import augment
from flaxtumor.data.io import read_image
from flaxtumor.data.lgg import Patient, discover
from flaxtumor.data.pipeline import eval_batches, train_batches
from flaxtumor.data.preprocess import (
    Box, Preprocessing, normalise, preprocess, resize_images, stack_context, mask_at_input_size, volume_stats,
)
from flaxtumor.data.synthetic import write_synthetic_dataset
from flaxtumor.inference import ContextWarning, Pipeline
from flaxtumor.models import build_model, build_segmenter
from flaxtumor.models.resunet import ResUNet
from flaxtumor.train.cli import main as train_main
from tests.fixtures_checkpoints import tiny  # noqa: F401  (session fixture: its classifier pairs with the segmenter)
from tests.train.helpers import tiny_config

REPO = Path(__file__).resolve().parents[2]
SIZE = 32
NORMALISATIONS = ["image_zscore", "volume_zscore", "imagenet", "caffe"]


# -- the neighbour rule -----------------------------------------------------------------------------------------------


def test_stack_context_orders_neighbours_and_replicates_the_edges():
    # Slice d, channel c holds 10 d + c: every channel of the stack says where it came from.
    volume = (10 * np.arange(4)[:, None] + np.arange(3)).astype(np.float32)[:, None, None, :] * np.ones((1, 2, 2, 1))
    stacked = stack_context(volume, 1)
    assert stacked.shape == (4, 2, 2, 9)
    expected = [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]]  # slices i-1, i, i+1; the ends repeat
    for i, slices in enumerate(expected):
        channels = [10 * d + c for d in slices for c in range(3)]
        assert np.array_equal(stacked[i], np.broadcast_to(np.array(channels, np.float32), (2, 2, 9)))
    assert stack_context(volume, 0) is volume
    assert np.array_equal(stack_context(volume[:1], 2), np.tile(volume[:1], 5))  # a lone slice is its own neighbours
    assert np.array_equal(stack_context(np.arange(3)[:, None], 2), [[0, 0, 0, 1, 2], [0, 0, 1, 2, 2], [0, 1, 2, 2, 2]])
    with pytest.raises(ValueError, match=">= 0"):
        stack_context(volume, -1)


def test_spec_round_trips_and_without_context_its_metadata_is_unchanged():
    spec = Preprocessing(64, "volume_zscore", "brain", context_slices=2)
    assert spec.to_dict()["context_slices"] == 2 and spec.channels == 15
    assert Preprocessing.from_dict(spec.to_dict()) == spec
    plain = Preprocessing(64, "image_zscore")
    assert plain.to_dict() == {"image_size": 64, "normalisation": "image_zscore"} and plain.channels == 3
    # The shipped checkpoints' preprocessing reads and writes back byte for byte.
    for model in ("classifier", "segmenter"):
        written = json.loads((REPO / "checkpoints" / model / "metadata.json").read_text())["preprocessing"]
        assert "context_slices" not in written
        assert Preprocessing.from_dict(written).context_slices == 0
        assert json.dumps(Preprocessing.from_dict(written).to_dict()) == json.dumps(written)
    assert Preprocessing.from_config(DataConfig(image_size=48, context_slices=1)) == Preprocessing(
        48, "image_zscore", "none", 1)
    with pytest.raises(ValueError, match="context_slices"):
        Preprocessing(64, "image_zscore", context_slices=-1)


@pytest.mark.parametrize("normalisation", NORMALISATIONS)
def test_a_stack_is_normalised_slice_by_slice(normalisation):
    rng = np.random.default_rng(0)
    volume = rng.integers(0, 256, (5, 24, 24, 3)).astype(np.uint8)
    plain = Preprocessing(SIZE, normalisation)
    spec = Preprocessing(SIZE, normalisation, context_slices=1)
    expected = stack_context(preprocess(volume, plain), 1)
    np.testing.assert_allclose(preprocess(volume, spec), expected, atol=1e-5)
    # The pipeline's order (stack the pixels, then normalise), with the volume's statistics for volume_zscore.
    resized = resize_images(volume, SIZE).astype(np.float32)
    stats = volume_stats(resized)
    np.testing.assert_allclose(normalise(stack_context(resized, 1), spec, stats), expected, atol=1e-5)


# -- config and model -------------------------------------------------------------------------------------------------


def test_config_errors_name_the_flag():
    with pytest.raises(ValueError, match="--context-slices.*>= 0"):
        Config().override(**{"data.context_slices": -1})
    with pytest.raises(ValueError, match="--context-slices 1.*--task cls"):
        Config().override(**{"train.task": "cls", "data.context_slices": 1})
    with pytest.raises(ValueError, match="--segmenter resunet"):
        Config().override(**{"model.segmenter": "resnet50_unet", "data.context_slices": 1})
    assert train_main(["--task", "cls", "--data", "synthetic", "--context-slices", "1"]) == 2


def _paths(module: nnx.Module) -> dict:
    return {k: v.shape for k, v in nnx.to_flat_state(nnx.state(module))}


def test_the_first_convolution_takes_the_stack_and_k0_is_todays_model():
    cfg = Config().override(**{"model.resunet_widths": (4, 8), "data.context_slices": 2})
    model = build_model(cfg, nnx.Rngs(0))
    today = _paths(ResUNet((4, 8), rngs=nnx.Rngs(0)))
    changed = {k for k, v in _paths(model).items() if today.get(k) != v}
    assert changed == {("encoder", 0, "conv1", "kernel"), ("encoder", 0, "proj_conv", "kernel")}
    assert _paths(model)[("encoder", 0, "conv1", "kernel")] == (3, 3, 15, 4)
    plain = build_model(Config().override(**{"model.resunet_widths": (4, 8)}), nnx.Rngs(0))
    assert _paths(plain) == today
    with pytest.raises(ValueError, match="'resunet' segmenter only"):
        build_segmenter(ModelConfig(segmenter="resnet_tiny_unet"), nnx.Rngs(0), in_channels=9)


@pytest.mark.parametrize("k", [0, 1])
def test_the_centre_output_changes_with_a_neighbour_only_with_context(k):
    cfg = Config().override(**{"model.resunet_widths": (4, 8), "data.context_slices": k, "data.image_size": 16})
    model = build_model(cfg, nnx.Rngs(0))
    model.eval()
    spec = Preprocessing.from_config(cfg.data)
    volume = np.random.default_rng(1).integers(0, 256, (3, 16, 16, 3)).astype(np.uint8)
    changed = volume.copy()
    changed[0] = 255 - changed[0]  # only slice 0, a neighbour of slice 1
    before, after = (np.asarray(model(preprocess(v, spec))) for v in (volume, changed))
    assert not np.array_equal(before[0], after[0])
    assert np.array_equal(before[2], after[2])  # two slices away: outside the context either way
    assert np.array_equal(before[1], after[1]) == (k == 0)


# -- the Grain pipeline -----------------------------------------------------------------------------------------------


def _volume(patient: Patient) -> np.ndarray:
    return np.stack([read_image(s.image_path) for s in patient.slices])


def test_neighbours_are_the_patients_slices_in_slice_order(synthetic_patients):
    a, b = synthetic_patients[:2]
    mixed = [b.slices[3], a.slices[1], b.slices[2], a.slices[0], b.slices[4], a.slices[2]]  # interleaved, unordered
    rows = pipeline.context_rows(mixed, 1)
    # a: slices 0, 1, 2 sit at positions 3, 1, 5; b: slices 2, 3, 4 at 2, 0, 4.
    assert rows.tolist() == [[2, 0, 4], [3, 1, 5], [2, 2, 0], [3, 3, 1], [0, 4, 4], [1, 5, 5]]


@pytest.mark.parametrize("normalisation, crop", [("image_zscore", "none"), ("volume_zscore", "brain")])
def test_eval_batches_equal_preprocess_of_the_volume(synthetic_patients, normalisation, crop):
    patients = synthetic_patients[:2]  # with the brain crop, neighbours share their patient's one box
    cfg = DataConfig(image_size=SIZE, normalisation=normalisation, crop=crop, context_slices=1)
    slices = [s for p in patients for s in p.slices]
    batches = list(eval_batches(slices, cfg, 16))
    assert all(b["image"].shape == (16, SIZE, SIZE, 9) for b in batches)
    images = np.concatenate([b["image"] for b in batches])[: len(slices)]
    spec = Preprocessing.from_config(cfg)
    expected = np.concatenate([preprocess(_volume(p), spec) for p in patients])
    np.testing.assert_allclose(images, expected, atol=1e-5)
    # Without the cache, and in training batches (augmentation off), the same rows.
    uncached = list(eval_batches(slices, dataclasses.replace(cfg, cache_decoded=False), 16))
    np.testing.assert_allclose(np.concatenate([b["image"] for b in uncached])[: len(slices)], images, atol=0)
    for b in train_batches(slices, dataclasses.replace(cfg, augment=False), 8, 0, 0):
        np.testing.assert_allclose(b["image"], images[b["index"]], atol=0)


def test_training_batches_with_augmentation_and_tumour_sampling(synthetic_patients):
    slices = [s for p in synthetic_patients[:2] for s in p.slices]
    cfg = DataConfig(image_size=SIZE, context_slices=2, sampling="tumour")
    batches = list(train_batches(slices, cfg, 8, seed=0, epoch=0))
    assert batches and all(b["image"].shape == (8, SIZE, SIZE, 15) and np.isfinite(b["image"]).all() for b in batches)
    # The sampler is the one without context: it draws centre slices, whose masks and labels the rows carry.
    plain = list(train_batches(slices, DataConfig(image_size=SIZE, sampling="tumour"), 8, seed=0, epoch=0))
    for b, p in zip(batches, plain):
        assert np.array_equal(b["index"], p["index"]) and np.array_equal(b["mask"], p["mask"])
        np.testing.assert_array_equal(b["image"][..., 6:9], p["image"])  # the centre slice, augmented alike


def test_augmentation_moves_a_stack_as_one():
    cfg = DataConfig(intensity_jitter=0.2)
    one = np.random.default_rng(0).uniform(0, 255, (SIZE, SIZE, 3)).astype(np.float32)
    mask = np.zeros((SIZE, SIZE, 1), np.float32)
    mask[8:20, 10:16] = 1
    stacked, stacked_mask = augment(np.tile(one, 3), mask, np.random.default_rng(5), cfg)
    alone, alone_mask = augment(one, mask, np.random.default_rng(5), cfg)
    for j in range(3):  # the same map and jitter for every slice of the stack, as for the slice alone
        np.testing.assert_array_equal(stacked[..., 3 * j : 3 * j + 3], alone)
    np.testing.assert_array_equal(stacked_mask, alone_mask)


# -- a tiny trained 2.5D segmenter, served and predicted out of fold --------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """`train.py --context-slices 1` on the synthetic set: 1 epoch of a 2-level ResUNet at 32²; its export folder."""
    root = tmp_path_factory.mktemp("context")
    config = root / "tiny.json"
    tiny_config(root / "run", "seg", **{"train.epochs": 1, "data.synthetic_slices": 10}).to_json(config)
    assert train_main(["--config", str(config), "--context-slices", "1", "--out", str(root / "run")]) == 0
    return root / "run" / "segmenter"


@pytest.fixture(scope="module")
def volume(tmp_path_factory) -> list[np.ndarray]:
    data = write_synthetic_dataset(tmp_path_factory.mktemp("volume"), n_patients=1, n_slices=6, size=64, seed=7)
    return [read_image(s.image_path) for s in discover(data)[0].slices]


def test_the_export_records_the_context(trained):
    meta = json.loads((trained / "metadata.json").read_text())
    assert meta["preprocessing"]["context_slices"] == 1 and meta["config"]["data"]["context_slices"] == 1
    model, metadata = load_inference(trained)
    assert metadata.preprocessing.channels == 9 and model.in_channels == 9


def _raw_masks(segmenter: Path, volume: list[np.ndarray], threshold: float) -> list[np.ndarray]:
    """The masks straight from the model on `preprocess` of the volume (no pipeline code)."""
    model, metadata = load_inference(segmenter)
    spec = metadata.preprocessing
    probs = np.asarray(jax.nn.sigmoid(model(preprocess(np.stack(volume), spec))))[..., 0]
    return [mask_at_input_size(p, threshold, Box(0, 0, *v.shape[:2]), v.shape[:2]) for p, v in zip(probs, volume)]


def test_pipeline_predicts_a_volume_with_its_neighbours_and_warns_on_lone_slices(trained, volume, tiny):  # noqa: F811
    pipe = Pipeline.from_checkpoints(trained.parent, classifier=tiny.checkpoints / "classifier", segmenter=trained,
                                     threshold=0.0, postprocess="none", mask_threshold=0.5)
    assert pipe.segmenter_spec.context_slices == 1 and pipe.classifier_spec.channels == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error", ContextWarning)  # a whole volume has its neighbours: no warning
        preds = pipe.predict_volume(volume)
        masks = pipe.segment(volume, volume=True)
    assert len(preds) == len(volume) and all(p.mask.shape == (64, 64) for p in preds)
    expected = _raw_masks(trained, volume, 0.5)
    assert any(e.any() for e in expected) and not all(e.all() for e in expected)  # masks worth comparing
    assert all(np.array_equal(m, e) for m, e in zip(masks, expected))
    assert all(np.array_equal(p.mask, e) for p, e in zip(preds, expected))  # gate open, no post-processing
    with pytest.warns(ContextWarning, match="neighbouring slices"):
        loose = pipe.predict_slices(volume[2:4])
    alone = [_raw_masks(trained, [v], 0.5)[0] for v in volume[2:4]]  # each slice its own neighbours
    assert all(np.array_equal(p.mask, a) for p, a in zip(loose, alone))
    with pytest.warns(ContextWarning):
        pipe.segment(volume[:1], volume=True)  # a volume of one slice has no neighbours either


def test_crossval_predicts_out_of_fold_with_the_same_neighbours(trained, synthetic_patients):
    patients = synthetic_patients[:2]
    results, metadata = oof.predict_fold(0, trained, patients)
    assert metadata.preprocessing.context_slices == 1
    model, _ = load_inference(trained)
    for r, p in zip(results, patients):
        x = preprocess(_volume(p), metadata.preprocessing)
        assert x.shape[-1] == 9
        probs = np.asarray(jax.nn.sigmoid(model(x)))[..., 0]
        assert r.probabilities.shape == (len(p.slices), SIZE, SIZE)
        np.testing.assert_allclose(r.probabilities.astype(np.float32), probs, atol=1e-3)  # stored in float16

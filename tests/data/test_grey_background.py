"""A grey background (issue 11): two of our 81 patients store their pre-contrast with a background of 103 and 61
instead of about 0, and the models missed their tumours. The rule that finds it (per volume), the repair, that
preprocessing, the brain crop and the training pipeline all read such a patient as if it were stored black, and the
two real patients."""

from pathlib import Path

import numpy as np
import pytest
import tifffile

from flaxtumor.data.io import read_image
from flaxtumor.data.lgg import discover
from flaxtumor.data.pipeline import eval_batches, train_batches
from flaxtumor.data.preprocess import (
    FLAIR, POST_CONTRAST, PRE_CONTRAST, Preprocessing, crop_box, grey_background, preprocess, remove_grey_background,
)
from flaxtumor.data.synthetic import write_synthetic_dataset
from tests.train.helpers import tiny_config

LEVEL = 70


def _grey(volume: np.ndarray, channel: int = PRE_CONTRAST, level: int = LEVEL) -> np.ndarray:
    """The volume as a scanner with a grey background would store it: `level` added to one sequence everywhere."""
    out = volume.copy()
    out[..., channel] = np.clip(volume[..., channel].astype(np.int16) + level, 0, 255).astype(np.uint8)
    return out


@pytest.fixture(scope="module")
def stored(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """A synthetic dataset whose first patient is written again with a grey pre-contrast background; (root, that
    patient's volume as first written (black), and as rewritten (grey))."""
    root = write_synthetic_dataset(tmp_path_factory.mktemp("grey"), n_patients=3, n_slices=8, size=128, seed=3)
    patient = discover(root)[0]
    black = np.stack([read_image(s.image_path) for s in patient.slices])
    grey = _grey(black)
    for s, image in zip(patient.slices, grey):
        tifffile.imwrite(s.image_path, image, photometric="rgb", compression="zlib")
    return root, black, grey


def test_the_rule_finds_a_grey_sequence_and_its_level_per_volume(stored):
    _, black, grey = stored
    assert grey_background(black) == ()
    assert grey_background(grey) == ((PRE_CONTRAST, LEVEL),)
    assert grey_background(list(grey)) == grey_background(grey)  # stacked or listed slices alike
    assert grey_background(_grey(black, POST_CONTRAST, 120)) == ((POST_CONTRAST, 120),)
    assert grey_background(_grey(black, level=40)) == ()  # below GREY_BACKGROUND: left alone
    # The decision is the volume's: an edge slice whose few outside pixels read brighter does not make it grey.
    edge = black.copy()
    edge[0, ..., PRE_CONTRAST] = np.where(edge[0, ..., FLAIR] <= 10, 90, edge[0, ..., PRE_CONTRAST])
    assert grey_background(edge[:1]) != () and grey_background(edge) == ()
    # Noise has almost no pixels outside a head: no background, grey or not.
    noise = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3)).astype(np.uint8)
    assert grey_background(noise) == ()


def test_the_repair_gives_back_the_black_volume(stored):
    _, black, grey = stored
    repaired = remove_grey_background(grey)
    unclipped = black[..., PRE_CONTRAST] <= 255 - LEVEL  # where adding the level lost nothing
    assert unclipped.mean() > 0.999
    assert np.array_equal(repaired[unclipped], black[unclipped])
    assert remove_grey_background(black) is black  # nothing to change: the same array, no copy
    one = remove_grey_background(grey[3], ((PRE_CONTRAST, LEVEL),))  # a given level, one slice
    assert np.array_equal(one[unclipped[3]], black[3][unclipped[3]])


@pytest.mark.parametrize("crop", ["none", "brain"])
def test_preprocessing_and_the_crop_read_a_grey_volume_as_the_black_one(stored, crop):
    _, black, grey = stored
    assert crop_box(grey, crop) == crop_box(black, crop)
    if crop == "brain":
        assert crop_box(grey, crop) != (0, 0, *grey.shape[1:3])  # the grey background alone would fill the image
    spec = Preprocessing(32, "volume_zscore", crop=crop)
    np.testing.assert_allclose(preprocess(grey, spec), preprocess(black, spec), atol=0.05)


def test_training_and_evaluation_batches_read_the_patient_as_preprocess_does(stored, tmp_path):
    root, black, grey = stored
    cfg = tiny_config(tmp_path, "seg", **{"data.root": str(root.parent), "data.augment": False,
                                          "data.sampling": "all", "data.image_size": 32}).data
    patient = discover(root)[0]
    rows = np.concatenate([b["image"] for b in eval_batches(patient.slices, cfg, 4)])[: len(patient.slices)]
    spec = Preprocessing.from_config(cfg)
    np.testing.assert_allclose(rows, preprocess(grey, spec), atol=1e-5)
    np.testing.assert_allclose(rows, preprocess(black, spec), atol=0.05)
    for batch in train_batches(patient.slices, cfg, 4, seed=0, epoch=0):
        for row, i in enumerate(batch["index"]):
            np.testing.assert_allclose(batch["image"][row], rows[i], atol=1e-5)


@pytest.mark.realdata
def test_the_two_grey_patients_of_kaggle_3m_and_no_other(lgg_root):
    found = {}
    for patient in discover(lgg_root):
        if background := grey_background([read_image(s.image_path) for s in patient.slices]):
            found[patient.patient_id] = background
    assert found == {"TCGA_FG_7637_20000922": ((PRE_CONTRAST, 103),), "TCGA_FG_A4MU_20030903": ((PRE_CONTRAST, 61),)}

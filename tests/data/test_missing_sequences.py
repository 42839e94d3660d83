"""Missing-sequence augmentation (`--missing-sequences P`, issue 11): kaggle_3m stores a sequence a patient lacks as a
copy of FLAIR, and this teaches the model such patients. The rule (which channels, how often, every slice of a stack
alike), the pipeline (only training examples, the same geometry as without it, volume statistics that match a filled
channel) and the config's and CLI's errors; and telling which sequences a stored volume really has."""

import numpy as np
import pytest

from flaxtumor.config import Config
from flaxtumor.data.augment import drop_sequences, fill_with_flair
from flaxtumor.data.lgg import load_dataset
from flaxtumor.data.pipeline import eval_batches, train_batches
from flaxtumor.data.preprocess import sequence_group
from flaxtumor.metrics import dice_by_group
from flaxtumor.train.cli import main as train_main
from tests.train.helpers import tiny_config


def _stack(m: int = 1) -> np.ndarray:
    """(8, 8, 3m): every channel a different constant, so a copy is easy to see."""
    return np.broadcast_to(np.arange(3 * m, dtype=np.float32) + 1, (8, 8, 3 * m)).copy()


def test_fill_with_flair_copies_each_slices_flair_into_the_named_sequences():
    image = _stack(m=3)  # a 2.5D stack: slices' channels 0-2, 3-5, 6-8; FLAIR at 1, 4, 7
    both = fill_with_flair(image)
    assert [both[0, 0, c] for c in range(9)] == [2, 2, 2, 5, 5, 5, 8, 8, 8]
    post = fill_with_flair(image, (2,))
    assert [post[0, 0, c] for c in range(9)] == [1, 2, 2, 4, 5, 5, 7, 8, 8]
    assert np.array_equal(image, _stack(m=3))  # the input is left as it was
    assert fill_with_flair(image, ()) is image


def test_drop_sequences_makes_each_pattern_equally_often_at_the_given_rate():
    rng = np.random.default_rng(0)
    counts: dict[tuple[int, ...], int] = {}
    for _ in range(6000):
        image, dropped = drop_sequences(_stack(), 0.3, rng)
        counts[dropped] = counts.get(dropped, 0) + 1
        for c in dropped:
            assert np.array_equal(image[..., c], image[..., 1])
        for c in {0, 2} - set(dropped):
            assert image[0, 0, c] == c + 1  # a sequence not dropped is untouched
    assert set(counts) == {(), (0,), (2,), (0, 2)}
    assert counts[()] == pytest.approx(0.7 * 6000, rel=0.05)
    for pattern in [(0,), (2,), (0, 2)]:
        assert counts[pattern] == pytest.approx(0.1 * 6000, rel=0.15)
    assert drop_sequences(_stack(), 0.0, rng)[1] == ()


def _batches(tmp_path, p: float, normalisation: str = "image_zscore"):
    cfg = tiny_config(tmp_path, "seg", **{"data.augment": True, "data.missing_sequences": p,
                                          "data.normalisation": normalisation})
    slices = [s for patient in load_dataset(cfg.data) for s in patient.slices]
    return cfg, slices, next(train_batches(slices, cfg.data, 8, seed=5, epoch=1))


def test_train_examples_lack_sequences_but_keep_their_geometry_and_eval_is_untouched(tmp_path):
    _, _, plain = _batches(tmp_path, 0.0)
    cfg, slices, filled = _batches(tmp_path, 1.0)
    x = filled["image"]
    assert np.array_equal(x[..., 1], plain["image"][..., 1])  # FLAIR and the augmentation's draws are unchanged
    assert np.array_equal(filled["mask"], plain["mask"])
    lacking = [[c for c in (0, 2) if np.allclose(x[k, ..., c], x[k, ..., 1])] for k in range(len(x))]
    assert all(lacking)  # p = 1: every example lacks at least one contrast
    for k, missing in enumerate(lacking):
        for c in {0, 2} - set(missing):
            assert np.array_equal(x[k, ..., c], plain["image"][k, ..., c])
    assert not any(np.allclose(plain["image"][k, ..., c], plain["image"][k, ..., 1])
                   for k in range(len(x)) for c in (0, 2))  # synthetic sequences differ: the check above can fail
    evaluation, reference = (next(eval_batches(slices, c.data, 8)) for c in (cfg, cfg.override(
        **{"data.missing_sequences": 0.0})))
    assert np.array_equal(evaluation["image"], reference["image"])


def test_with_volume_zscore_a_filled_sequence_is_normalised_as_flair(tmp_path):
    # inference on a patient whose contrast is a FLAIR copy computes that channel's volume statistics from the copy
    _, _, filled = _batches(tmp_path, 1.0, normalisation="volume_zscore")
    x = filled["image"]
    for k in range(len(x)):
        assert any(np.allclose(x[k, ..., c], x[k, ..., 1], atol=1e-5) for c in (0, 2))


@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_config_and_cli_refuse_a_rate_outside_0_1(tmp_path, p):
    with pytest.raises(ValueError, match="missing-sequences"):
        tiny_config(tmp_path, "seg", **{"data.missing_sequences": p})
    assert train_main(["--task", "seg", "--data", "synthetic", "--image-size", "32", "--missing-sequences", str(p),
                       "--out", str(tmp_path / "run"), "--epochs", "1"]) == 2


def test_the_cli_flag_lands_in_the_config(tmp_path):
    from flaxtumor.train.cli import build_parser, make_config

    cfg = make_config(build_parser().parse_args(["--task", "seg", "--data", "synthetic", "--missing-sequences", "0.3",
                                                 "--out", str(tmp_path / "run")]))
    assert cfg.data.missing_sequences == 0.3
    assert Config.from_dict(cfg.to_dict()).data.missing_sequences == 0.3


def test_sequence_group_tells_which_contrasts_are_flair_copies():
    volume = np.random.default_rng(0).integers(1, 255, (4, 8, 8, 3), np.uint8)
    assert sequence_group(volume) == "complete"
    assert sequence_group(fill_with_flair(volume, (2,))) == "no post-contrast"
    assert sequence_group(fill_with_flair(volume, (0,))) == "no pre-contrast"
    assert sequence_group(fill_with_flair(volume)) == "FLAIR only"
    assert sequence_group(np.zeros((2, 8, 8, 3), np.uint8)) == "complete"  # nothing to tell
    one_slice_differs = fill_with_flair(volume)
    one_slice_differs[1, 0, 0, 0] ^= 1  # a contrast equal to FLAIR on all but one pixel is a real sequence
    assert sequence_group(one_slice_differs) == "no post-contrast"


def test_dice_by_group_summarises_each_group_and_leaves_empty_patients_unscored():
    report = dice_by_group({"a": 0.8, "b": 0.6, "c": 0.2, "d": float("nan")},
                           {"a": "complete", "b": "complete", "c": "FLAIR only", "d": "FLAIR only"})
    assert list(report) == ["FLAIR only", "complete"]
    assert report["complete"]["patients"] == ["a", "b"] and report["complete"]["mean"] == pytest.approx(0.7)
    assert report["FLAIR only"]["n_scored"] == 1 and report["FLAIR only"]["empty_both_patients"] == ["d"]


@pytest.mark.realdata
def test_real_patients_that_lack_sequences_are_told_apart(lgg_root):
    from flaxtumor.data.io import read_image
    from flaxtumor.data.lgg import discover

    known = {"TCGA_FG_A60K_20040224": "FLAIR only", "TCGA_HT_7877_19980917": "FLAIR only",
             "TCGA_DU_6407_19860514": "no post-contrast", "TCGA_CS_4941_19960909": "complete"}
    patients = [p for p in discover(lgg_root) if p.patient_id in known]
    if not patients:
        pytest.skip(f"none of {sorted(known)} in {lgg_root}")
    for p in patients:
        assert sequence_group(np.stack([read_image(s.image_path) for s in p.slices])) == known[p.patient_id]

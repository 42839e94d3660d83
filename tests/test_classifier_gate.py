"""The classifier gate decided on patients neither model trained on: which patients qualify, the candidates, the
choice (a gate that empties a false region wins; a gate that changes nothing loses to the classifier off), and the
command end to end on a tiny cross-validation."""

import json
import math

import numpy as np
import pytest

from flaxtumor import classifier_gate as G
from flaxtumor.checkpoint_metadata import InferenceMetadata
from flaxtumor.config import Config
from flaxtumor.data.preprocess import Preprocessing
from flaxtumor.operating_point import OperatingPoint

THRESHOLDS = (0.25, 0.5, 0.75)
CV_POINT = OperatingPoint(threshold=math.inf, min_tumour_area=0.01, postprocess="none", gate=True)


def _metadata(split, **extra) -> InferenceMetadata:
    return InferenceMetadata(Config(), "cls", Preprocessing(32, "image_zscore"), split=split, extra=extra)


def test_held_out_patients_leave_out_anyone_the_classifier_or_its_backbone_trained_on():
    meta = _metadata({"train": ["a"], "val": ["b", "c", "d"]}, backbone_provenance={"patients": ["a", "c"]})
    assert G.held_out_patients(meta) == ["b", "d"]
    meta = _metadata({"train": ["a"], "val": ["b"]}, trained_patients=["a", "b"])  # the leakage guard's record wins
    with pytest.raises(ValueError, match="no validation patient"):
        G.held_out_patients(meta)


def test_candidates_are_off_then_the_classifier_alone_then_fused_with_the_area_gate():
    candidates = G.gate_candidates(CV_POINT, THRESHOLDS)
    assert candidates[0] == CV_POINT
    assert [(c.threshold, c.min_tumour_area, c.gate) for c in candidates[1:]] == [
        (t, a, True) for a in (0.0, 0.01) for t in THRESHOLDS]
    no_area = CV_POINT.override(min_tumour_area=0.0, gate=False)  # the segmenter alone: no fused variant
    assert [c.min_tumour_area for c in G.gate_candidates(no_area, THRESHOLDS)[1:]] == [0.0] * len(THRESHOLDS)
    assert all(c.postprocess == "none" and c.mask_threshold == CV_POINT.mask_threshold for c in candidates)


def _patient() -> tuple[np.ndarray, np.ndarray]:
    """4 slices of 10x10: tumour on slices 1-2, drawn exactly; a false 4x4 region on tumour-free slice 3."""
    truth = np.zeros((4, 10, 10), bool)
    truth[1:3, 2:6, 2:6] = True
    masks = truth.copy()
    masks[3, 5:9, 5:9] = True
    return masks, truth


def test_a_gate_that_empties_a_false_region_wins():
    masks, truth = _patient()
    probs = np.array([0.1, 0.9, 0.8, 0.2])  # the classifier clears the false region's slice
    choice = G.choose_gate([(probs, masks, truth)], CV_POINT, THRESHOLDS)
    off = choice["candidates"][0]
    assert off["per_patient_dice_mean"] == pytest.approx(2 * 32 / (2 * 32 + 16))
    assert choice["chosen"]["per_patient_dice_mean"] == 1.0
    # only the classifier's calls alone can empty it: the fused gate keeps a region above the area floor
    assert choice["point"].min_tumour_area == 0.0 and choice["point"].threshold in (0.25, 0.5, 0.75)


def test_slice_calls_are_the_verdicts_so_the_classifier_off_is_scored_by_its_masks():
    masks, truth = _patient()
    probs = np.array([0.1, 0.9, 0.8, 0.2])
    choice = G.choose_gate([(probs, masks, truth)], CV_POINT, THRESHOLDS)
    off = choice["candidates"][0]
    # off: masks on slices 1, 2 (tumour) and 3 (false region) -> every tumour slice called, 1 of 2 clear ones wrong
    assert (off["verdict_sensitivity"], off["verdict_specificity"]) == (1.0, 0.5)
    assert (choice["chosen"]["verdict_sensitivity"], choice["chosen"]["verdict_specificity"]) == (1.0, 1.0)


def test_a_gate_that_changes_nothing_loses_to_the_classifier_off():
    masks, truth = _patient()
    masks[3] = False  # no false region left to remove
    probs = np.array([0.9, 0.9, 0.9, 0.9])  # flags everything below 0.9: the same masks and calls as off
    choice = G.choose_gate([(probs, masks, truth)], CV_POINT, THRESHOLDS)
    assert choice["point"] == CV_POINT and math.isinf(choice["chosen"]["threshold"])
    assert all(r["per_patient_dice_mean"] == 1.0 for r in choice["candidates"])


def test_the_command_decides_the_gate_on_a_tiny_cross_validation(tiny_cv, tmp_path, capsys):
    from flaxtumor.data.lgg import load_dataset
    from flaxtumor.operating_point import read_operating_point
    from tests.fixtures_checkpoints import export_tiny
    from tests.train.helpers import tiny_config

    _, cv = tiny_cv
    ids = sorted(p.patient_id for p in load_dataset(tiny_config(cv).data))
    checkpoints = tmp_path / "checkpoints"
    export_tiny(checkpoints / "classifier", "cls", "image_zscore", 0.5,
                {"train": ids[:2], "val": ids[2:], "test": [], "seed": 0})
    out = tmp_path / "gate.json"
    args = ["--cv", str(cv), "--data", "synthetic", "--checkpoints", str(checkpoints), "--out", str(out)]
    assert G.main(args) == 0
    written = json.loads(out.read_text())
    gate = written["classifier_gate"]
    assert gate["patients"] == ids[2:]  # the classifier's held-out patients, and only those
    assert len(gate["candidates"]) == 1 + len(G.gate_candidates(read_operating_point(cv)[0], [0.1])[1:]) * 19
    assert gate["chosen"] in gate["candidates"]
    assert written["tuned_on"] == json.loads((cv / "pipeline.json").read_text())["tuned_on"]  # CV's record kept
    if written["threshold"] not in (None, 0.5):  # a gate tuned away from the classifier's own 0.5 flags at 0.5
        assert written["flag_threshold"] == 0.5 and gate["flags"]["flag_threshold"] == 0.5
        assert 0.0 <= gate["flags"]["flags_tumour_free_slices"] <= 1.0
    else:
        assert "flag_threshold" not in written and "flags" not in gate
    assert "neither model trained on" in capsys.readouterr().out
    # a classifier that trained on every patient leaves nowhere to decide: one clear error
    export_tiny(tmp_path / "all" / "classifier", "cls", "image_zscore", 0.5, {"train": ids, "val": [], "test": []})
    assert G.main([*args[:4], "--checkpoints", str(tmp_path / "all"), *args[6:]]) == 2
    assert "no validation patient" in capsys.readouterr().err

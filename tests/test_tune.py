"""Operating-point tuning: scores on hand-made outputs, and the CLI on tiny checkpoints (validation patients only)."""

import json
import shutil

import numpy as np
import pytest

from flaxtumor.inference import Pipeline
from flaxtumor.operating_point import jsonable
from flaxtumor.operating_point import SAFE_POSTPROCESS_RULES, OperatingPoint
from flaxtumor.tune import choose, main, score
from tests.fixtures_checkpoints import tiny  # noqa: F401  (session fixture)


def _patient(probs, masks, truth):
    return np.asarray(probs), np.asarray(masks, bool), np.asarray(truth, bool)


def test_score_follows_threshold_fusion_and_lcc():
    truth = np.zeros((3, 8, 8), bool)
    truth[1, 2:6, 2:6] = True  # 16 px on slice 1 only
    masks = np.zeros_like(truth)
    masks[1, 2:6, 2:6] = True
    masks[2, 0, 0] = True  # a 1-px false positive, far from the tumour
    raw = [_patient([0.1, 0.3, 0.9], masks, truth)]

    def at(threshold, area, lcc):
        return OperatingPoint(threshold=threshold, min_tumour_area=area, postprocess="largest_component" if lcc else "none")

    # classifier alone at 0.5 keeps only slice 2 (the false positive): Dice 0
    assert score(raw, at(0.5, 0.0, lcc=False))["per_patient_dice_mean"] == 0.0
    # at 0.2 both slices pass: Dice = 2*16 / (17 + 16)
    assert score(raw, at(0.2, 0.0, lcc=False))["per_patient_dice_mean"] == pytest.approx(32 / 33)
    # LCC removes the isolated pixel
    assert score(raw, at(0.2, 0.0, lcc=True))["per_patient_dice_mean"] == 1.0
    # the fused gate rescues slice 1 at 0.5 (area 16/64 ≥ 0.1); LCC then drops slice 2's pixel
    fused = score(raw, at(0.5, 0.1, lcc=True))
    assert fused["per_patient_dice_mean"] == 1.0
    assert fused["detection_sensitivity"] == 1.0 and fused["detection_specificity"] == 0.5


def test_cli_tunes_on_validation_patients_and_the_pipeline_reads_it(tiny, tmp_path):  # noqa: F811
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(tiny.checkpoints, checkpoints)
    assert main(["--data", str(tiny.data), "--checkpoints", str(checkpoints)]) == 0
    point = json.loads((checkpoints / "pipeline.json").read_text())
    assert point["tuned_on"]["patients"] == list(tiny.val)
    assert {r["name"] for r in point["ablation"]} >= {"segmenter alone (no gate)", "chosen operating point"}
    p = Pipeline.from_checkpoints(checkpoints).point
    assert (p.threshold, p.postprocess, p.tta, p.min_tumour_area) == (
        point["threshold"], point.get("postprocess", "none"), point["tta"], point["min_tumour_area"])


def test_cli_refuses_checkpoints_without_validation_patients(tiny, tmp_path, capsys):  # noqa: F811
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(tiny.checkpoints, checkpoints)
    meta_file = checkpoints / "segmenter" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    meta["split"]["val"] = []
    meta_file.write_text(json.dumps(meta))
    assert main(["--data", str(tiny.data), "--checkpoints", str(checkpoints)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(checkpoints / "segmenter") in err  # one line, naming the checkpoint
    assert "no validation patients" in err and "--patients" in err


def test_cli_tunes_on_given_patients_but_never_on_trained_ones(tiny, tmp_path, capsys):  # noqa: F811
    trained = json.loads((tiny.checkpoints / "segmenter" / "metadata.json").read_text())["split"]["train"]
    out = tmp_path / "pipeline.json"
    base = ["--data", str(tiny.data), "--checkpoints", str(tiny.checkpoints), "--out", str(out), "--thresholds", "0.5"]
    assert main(base + ["--patients", tiny.val[0]]) == 0
    tuned_on = json.loads(out.read_text())["tuned_on"]
    assert tuned_on["patients"] == [tiny.val[0]] and "--patients" in tuned_on["split"]
    assert main(base + ["--patients", tiny.val[0], trained[0]]) == 2
    assert "trained the checkpoints" in capsys.readouterr().err


def test_ablation_shows_the_segmenter_alone_the_rules_and_the_classifier_off():
    truth = np.zeros((3, 64, 64), bool)
    truth[1, 10:26, 10:26] = True  # 256 px = 6.25 % of the slice
    masks = truth.copy()
    masks[2, 0, 0] = True  # a 1-px false positive (1/4096 of the slice) on a tumour-free slice
    # the classifier misses the tumour slice and calls the empty slice 0: only the segmenter's area finds the tumour
    raw = [_patient([0.9, 0.01, 0.01], masks, truth)]
    point = choose({False: raw, True: raw}, 0.5, ["p"], thresholds=(0.5,))
    # the fused gate's smallest area (0.05 %) calls slice 1 and not slice 2: Dice 1 with no post-processing, which
    # wins the tie with the component floors
    assert (point["min_tumour_area"], point["postprocess"], point["tta"]) == (0.0005, "none", False)
    rows = {r["name"]: r for r in point["ablation"]}
    off = rows["classifier off (area-only calls)"]
    assert off["threshold"] == float("inf") and off["min_tumour_area"] == point["min_tumour_area"]
    assert off["detection_accuracy"] == 1.0 and off["per_patient_dice_mean"] == 1.0
    assert rows["segmenter alone (no gate)"]["per_patient_dice_mean"] == pytest.approx(512 / 513)
    alone = rows["segmenter alone + post-processing (no gate)"]
    assert alone["gate"] is False and alone["postprocess"] == "none"
    legacy = rows["chosen, with the largest component instead"]
    assert legacy["postprocess"] == "largest_component" and legacy["per_patient_dice_mean"] == 1.0
    assert json.loads(json.dumps(jsonable(point)))["ablation"][-1]["threshold"] is None  # strict JSON: off = null


def test_dice_ties_go_to_youden_j_not_to_sensitivity():
    truth = np.zeros((4, 64, 64), bool)
    truth[:2, 10:26, 10:26] = True  # tumour on slices 0 and 1
    masks = np.zeros_like(truth)
    masks[0] = truth[0]  # the segmenter outlines it on slice 0 only, so gating slice 1 changes no Dice
    # the classifier is sure of slice 0 and lukewarm (0.3) on the other tumour slice and on both empty slices
    raw = [_patient([0.9, 0.3, 0.3, 0.3], masks, truth)]
    low, high = (score(raw, OperatingPoint(threshold=t)) for t in (0.2, 0.5))
    assert low["per_patient_dice_mean"] == high["per_patient_dice_mean"]  # a Dice tie
    assert (low["detection_sensitivity"], low["detection_specificity"]) == (1.0, 0.0)  # what sensitivity chose: J 0
    assert (high["detection_sensitivity"], high["detection_specificity"]) == (0.5, 1.0)  # J 0.5
    point = choose({False: raw, True: raw}, 0.5, ["p"], thresholds=(0.2, 0.5))
    assert point["threshold"] == 0.5 and point["validation"]["detection_specificity"] == 1.0
    # then the simpler setting: the fused gate adds no call here, and no rule changes the Dice
    assert (point["min_tumour_area"], point["postprocess"], point["tta"]) == (0.0, "none", False)
    assert "Youden" in point["tuned_on"]["criterion"]


def test_the_grid_never_offers_the_largest_component():
    truth = np.zeros((2, 64, 64), bool)
    truth[0, 10:20, 10:20] = True
    raw = [_patient([0.9, 0.1], truth, truth)]
    point = choose({False: raw, True: raw}, 0.5, ["p"], thresholds=(0.5,))
    assert point["tuned_on"]["grid"]["postprocess"] == list(SAFE_POSTPROCESS_RULES)
    assert "largest_component" not in SAFE_POSTPROCESS_RULES and "none" in SAFE_POSTPROCESS_RULES


def test_cli_names_the_checkpoints_flag_when_the_folder_is_missing(tmp_path, capsys):
    assert main(["--data", "synthetic", "--checkpoints", str(tmp_path / "none")]) == 2
    assert "--checkpoints" in capsys.readouterr().err


def test_cli_searches_the_thresholds_it_is_given(tiny, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "wide.json"
    base = ["--data", str(tiny.data), "--checkpoints", str(tiny.checkpoints), "--out", str(out)]
    assert main(base + ["--thresholds", "0.6", "0.02", "0.6"]) == 0
    point = json.loads(out.read_text())
    assert point["tuned_on"]["grid"]["threshold"] == [0.02, 0.6] and point["threshold"] in (0.02, 0.6)
    assert main(base + ["--thresholds", "1.5"]) == 2
    assert "--thresholds must lie in [0, 1]" in capsys.readouterr().err


def test_choice_key_orders_dice_then_youden_j_then_simplicity():
    from flaxtumor.operating_point import choice_key

    base = dict(tta=False, postprocess="none", min_tumour_area=0.0)
    assert choice_key(0.85, 0.5, 0.5, **base) > choice_key(0.84, 1.0, 1.0, **base)  # Dice first
    assert choice_key(0.84001, 0.9, 0.9, **base) > choice_key(0.83996, 1.0, 0.7, **base)  # a Dice tie goes to J
    simpler = choice_key(0.84, 0.9, 0.9, **base)
    assert simpler > choice_key(0.84, 0.9, 0.9, tta=False, postprocess="drop_small_0.002", min_tumour_area=0.0)
    assert simpler > choice_key(0.84, 0.9, 0.9, tta=False, postprocess="none", min_tumour_area=0.001)
    assert choice_key(0.84, float("nan"), 0.9, **base) < choice_key(0.84, 0.1, 0.1, **base)  # undefined J is worst

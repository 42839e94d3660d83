"""Comparing recipes on the same held-out patients, paired by patient: which runs may be compared, the paired
difference and its interval, the command end to end on two tiny runs of one fold, and the FLAIR-only stress
test."""

import json

import numpy as np
import pytest

from flaxtumor import compare_runs as C
from flaxtumor.checkpoint_metadata import InferenceMetadata
from flaxtumor.config import Config
from flaxtumor.data.preprocess import Preprocessing


def test_paired_difference_counts_and_leaves_out_unscored_patients():
    base = {"a": 0.5, "b": 0.8, "c": float("nan"), "d": 0.7}
    other = {"a": 0.6, "b": 0.7, "c": 0.9, "d": 0.7}
    v = C.paired(base, other)
    assert v["n_patients"] == 3 and (v["better"], v["worse"], v["same"]) == (1, 1, 1)
    assert v["mean_difference"] == pytest.approx(0.0)
    lo, hi = v["mean_difference_ci95"]
    assert lo <= 0.0 <= hi and lo < hi


def _meta(val, trained=()) -> InferenceMetadata:
    return InferenceMetadata(Config(), "seg", Preprocessing(32, "image_zscore"), split={"train": [], "val": list(val)},
                             extra={"trained_patients": list(trained)})


def test_runs_must_hold_out_the_same_patients_and_train_on_none_of_them():
    assert C.held_out_patients({"a": _meta(["p2", "p1"]), "b": _meta(["p1", "p2"])}) == ["p1", "p2"]
    with pytest.raises(ValueError, match="hold out different patients"):
        C.held_out_patients({"a": _meta(["p1"]), "b": _meta(["p2"])})
    with pytest.raises(ValueError, match="trained on 1 of the held-out"):
        C.held_out_patients({"a": _meta(["p1"]), "b": _meta(["p1"], trained=["p1"])})
    with pytest.raises(ValueError, match="no validation patients"):
        C.held_out_patients({"a": _meta([]), "b": _meta([])})


def test_two_tiny_runs_of_one_fold_compared_by_patient(tmp_path, capsys):
    from flaxtumor.train import loop
    from tests.train.helpers import tiny_config

    runs = []
    for seed in (0, 1):
        out = tmp_path / f"seed{seed}"
        loop.run(tiny_config(out, "seg", **{"train.epochs": 1, "data.fold": 0, "data.folds": 2, "train.seed": seed}))
        runs.append(out)
    report_file = tmp_path / "compare.json"
    assert C.main([str(runs[0]), str(runs[1]), str(runs[0]), "--out", str(report_file)]) == 0
    report = json.loads(report_file.read_text())  # strict JSON: no NaN
    first, second, again = report["runs"]
    assert sorted(first["per_patient_dice"]) == report["patients"]
    scored = sum(v is not None for v in first["per_patient_dice"].values())
    assert second["versus_first"]["n_patients"] == scored
    # the baseline against itself: no difference, every patient the same
    assert again["versus_first"]["mean_difference"] == 0.0 and again["versus_first"]["same"] == scored
    assert "vs first" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        C.main([str(runs[0])])
    # --ensemble: one more row, the runs' averaged probabilities; a run with itself is that run exactly
    assert C.main([str(runs[0]), str(runs[0]), "--ensemble", "--out", str(report_file)]) == 0
    *_, ensemble = json.loads(report_file.read_text())["runs"]
    assert ensemble["run"] == "ensemble of the 2 runs"
    assert ensemble["versus_first"]["mean_difference"] == 0.0 and ensemble["versus_first"]["same"] == scored
    assert C.main([str(runs[0]), str(runs[1]), "--ensemble", "--out", str(report_file)]) == 0
    assert len(json.loads(report_file.read_text())["runs"]) == 3
    assert C.main([str(runs[0]), str(runs[1]), "--flair-only", "--out", str(report_file)]) == 0
    assert "FLAIR only" in json.loads(report_file.read_text())["input"]
    # --versus-crossval: the first run's Dice recorded as a cross-validation's out-of-fold result is the same baseline
    cv_file = tmp_path / "crossval.json"
    cv_file.write_text(json.dumps(_crossval(report["patients"], first["per_patient_dice"])))
    assert C.main([str(runs[1]), "--versus-crossval", str(cv_file), "--out", str(report_file)]) == 0
    recorded, run = json.loads(report_file.read_text())["runs"]
    assert recorded["run"].endswith("(fold 0, recorded)") and recorded["epoch"] == "1/2"
    assert recorded["mean"] == pytest.approx(first["mean"]) and recorded["worst"] == pytest.approx(first["worst"])
    assert run["versus_first"] == second["versus_first"]
    assert C.main([str(runs[0]), "--versus-crossval", str(cv_file), "--flair-only"]) == 2


def _crossval(held_out, dice, threshold=0.5):
    """A finished cross-validation's crossval.json, as much of it as `recorded_row` reads: `held_out` was fold 0."""
    return {"task": "seg", "threshold": threshold, "fold_of": {**{p: 0 for p in held_out}, "other": 1},
            "per_patient_dice": {**dice, "other": 0.5},
            "recommended_epochs": {"per_fold": [{"fold": 0, "best_epoch": 1, "epochs_trained": 2}]}}


def test_a_recorded_cross_validation_is_a_baseline_only_for_exactly_one_of_its_folds(tmp_path):
    cv_file = tmp_path / "crossval.json"
    cv_file.write_text(json.dumps(_crossval(["a", "b", "c"], {"a": 0.2, "b": None, "c": 0.8})))
    row = C.recorded_row(cv_file, ["a", "b", "c"], 0.5)
    assert row["mean"] == pytest.approx(0.5) and row["worst"] == 0.2 and np.isnan(row["per_patient_dice"]["b"])
    assert C.paired(row["per_patient_dice"], {"a": 0.3, "b": 0.9, "c": 0.8})["n_patients"] == 2
    with pytest.raises(ValueError, match="other patients"):
        C.recorded_row(cv_file, ["a", "b"], 0.5)
    with pytest.raises(ValueError, match="not one fold"):
        C.recorded_row(cv_file, ["a", "other"], 0.5)
    with pytest.raises(ValueError, match="not one fold"):
        C.recorded_row(cv_file, ["a", "z"], 0.5)
    with pytest.raises(ValueError, match="threshold"):
        C.recorded_row(cv_file, ["a", "b", "c"], 0.4)
    cv_file.write_text(json.dumps({"task": "cls"}))
    with pytest.raises(ValueError, match="not a segmenter"):
        C.recorded_row(cv_file, ["a"], 0.5)


def test_flair_only_predicts_the_patients_with_both_contrasts_replaced_by_flair(tmp_path, monkeypatch):
    from flaxtumor import oof
    from flaxtumor.data.augment import fill_with_flair
    from flaxtumor.data.lgg import load_dataset
    from flaxtumor.train import loop
    from tests.train.helpers import tiny_config

    cfg = tiny_config(tmp_path / "run", "seg", **{"train.epochs": 1})
    checkpoint = loop.run(cfg)["checkpoint"]
    patients = load_dataset(cfg.data)[:2]
    stressed, _ = oof.predict_fold(0, checkpoint, patients, flair_only=True)
    as_stored, _ = oof.predict_fold(0, checkpoint, patients)
    read = oof.read_image
    monkeypatch.setattr(oof, "read_image", lambda path: fill_with_flair(read(path)))
    flair_patients, _ = oof.predict_fold(0, checkpoint, patients)
    for a, b, c in zip(stressed, flair_patients, as_stored):
        assert np.array_equal(a.probabilities, b.probabilities)
        assert not np.array_equal(a.probabilities, c.probabilities)  # the synthetic contrasts are not FLAIR


def _oof(pid: str, value: float, size: int = 4):
    from flaxtumor.oof import OutOfFold

    return OutOfFold(pid, 0, np.full((2, size, size), value, np.float16), np.arange(2))


def test_ensemble_averages_each_patients_probabilities_and_refuses_other_geometries():
    rows = [{"preprocessing": Preprocessing(32, "image_zscore").to_dict()}] * 2
    mean = C.averaged([[_oof("a", 0.2), _oof("b", 1.0)], [_oof("a", 0.6), _oof("b", 0.0)]], rows)
    assert [r.patient_id for r in mean] == ["a", "b"]
    assert np.allclose(mean[0].probabilities, 0.4, atol=1e-3) and np.allclose(mean[1].probabilities, 0.5)
    other = [rows[0], {"preprocessing": Preprocessing(64, "image_zscore").to_dict()}]
    with pytest.raises(ValueError, match="image size, crop"):
        C.averaged([[_oof("a", 0.2)], [_oof("a", 0.6, 8)]], other)

"""A tiny cross-validation end to end (synthetic data, tiny ResUNet, 2 folds, 1 epoch, 32²): folds disjoint by patient,
out-of-fold predictions cover every patient exactly once, the report's numbers follow from them, the chosen
post-processing is written as an operating point that reproduces them, the all-patient model's epochs come from the
folds, and --resume skips finished folds."""

import json
import math
import shlex

import numpy as np
import pytest
from PIL import Image

from flaxtumor import crossval, oof
from flaxtumor import metrics as M
from flaxtumor.data.io import read_mask
from flaxtumor.data.lgg import load_dataset, load_split
from flaxtumor.operating_point import gate_and_postprocess, read_operating_point
from tests.train.helpers import CV_FOLDS, tiny_config


def _at_size(probabilities: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A model-size probability map resized (bilinear) to a mask's size, written out here rather than imported."""
    return np.asarray(Image.fromarray(probabilities.astype(np.float32)).resize(shape[::-1], Image.BILINEAR))


FOLDS = CV_FOLDS


@pytest.fixture(scope="module")
def cv(tiny_cv):
    return tiny_cv


def test_folds_are_disjoint_by_patient_and_cover_everyone(cv):
    config, out = cv
    patients = {p.patient_id for p in load_dataset(tiny_config(out).data)}
    splits = [load_split(crossval.fold_dir(out, k) / "split.json") for k in range(FOLDS)]
    held = [set(s.val) for s in splits]
    assert not held[0] & held[1] and held[0] | held[1] == patients
    for k, s in enumerate(splits):
        assert set(s.train) == patients - set(s.val) and not s.test  # every other patient trains
        trained = json.loads((crossval.export_path(out, k, "seg") / "metadata.json").read_text())["trained_patients"]
        assert trained == sorted(patients - held[k])  # what reached its training batches (the leakage guard)
        assert json.loads((crossval.fold_dir(out, splits.index(s)) / "config.json").read_text())["data"]["fold"] \
            == splits.index(s)


def test_out_of_fold_predictions_cover_every_patient_once(cv):
    _, out = cv
    patients = {p.patient_id: p for p in load_dataset(tiny_config(out).data)}
    files = sorted((out / crossval.OOF_DIR).glob("*.npz"))
    assert sorted(f.stem for f in files) == sorted(patients)
    report = json.loads((out / crossval.CV_FILE).read_text())
    assert report["n_patients"] == len(patients) and sorted(report["per_patient_dice"]) == sorted(patients)
    for f in files:
        oof = np.load(f)
        p = patients[f.stem]
        assert oof["probabilities"].shape == (len(p.slices), 32, 32)
        assert np.array_equal(oof["slice_index"], [s.slice_index for s in p.slices])
        assert f.stem in load_split(crossval.fold_dir(out, int(oof["fold"])) / "split.json").val
        assert report["fold_of"][f.stem] == int(oof["fold"])
        # The reported Dice follows from the saved volume, at the masks' own size: probabilities resized, then
        # thresholded.
        probs = oof["probabilities"]
        truth = np.stack([read_mask(s.mask_path) for s in p.slices])
        pred = np.stack([_at_size(x, t.shape) >= report["threshold"] for x, t in zip(probs, truth)])
        assert report["per_patient_dice"][f.stem] == pytest.approx(M.dice(pred, truth), abs=1e-6, nan_ok=True)
        assert oof["flipped"].shape == probs.shape and oof["flipped"].dtype == np.float16  # flip TTA, for the lever


def test_flip_tta_volumes_average_the_slice_and_its_flip_as_the_pipeline_does(cv):
    from flaxtumor.compiled_model import CompiledModel
    from flaxtumor.checkpoints import load_inference
    from flaxtumor.data.preprocess import preprocess

    _, out = cv
    patient = load_dataset(tiny_config(out).data)[0]
    fold = json.loads((out / crossval.CV_FILE).read_text())["fold_of"][patient.patient_id]
    checkpoint = crossval.export_path(out, fold, "seg")
    (r,), meta = oof.predict_fold(fold, checkpoint, [patient], tta=True)
    model, _ = load_inference(checkpoint)
    volume = np.stack([crossval.read_image(s.image_path) for s in patient.slices])
    x = preprocess(volume, meta.preprocessing)
    served = CompiledModel(lambda: model, 4, 32)
    np.testing.assert_allclose(r.flipped, served(x, tta=True)[..., 0], atol=2e-3)  # float16 storage
    np.testing.assert_allclose(r.probabilities, served(x, tta=False)[..., 0], atol=2e-3)
    assert not np.array_equal(r.flipped, r.probabilities)


def test_the_levers_are_paired_differences_on_the_same_patients(cv):
    _, out = cv
    report = json.loads((out / crossval.CV_FILE).read_text())
    pp, lever = report["postprocessing"], report["levers"]
    diffs = [pp["per_patient_dice"][k] - v for k, v in report["per_patient_dice"].items() if not math.isnan(v)]
    assert lever["postprocessing"]["mean_difference"] == pytest.approx(np.mean(diffs))
    assert lever["postprocessing"]["n_patients"] == len(diffs)
    tta = lever["flip_tta"]
    assert tta["n_patients"] == tta["better"] + tta["worse"] + tta["same"] == len(diffs)
    assert tta["volumetric_dice"]["mean"] - pp["volumetric_dice"]["mean"] == pytest.approx(tta["mean_difference"])
    assert read_operating_point(out)[0].tta is False  # measured, never chosen


def test_report_headline_and_intervals(cv):
    _, out = cv
    report = json.loads((out / crossval.CV_FILE).read_text())
    scores = [v for v in report["per_patient_dice"].values() if v is not None and not np.isnan(v)]
    v = report["volumetric_dice"]
    assert v["mean"] == pytest.approx(np.mean(scores)) and v["median"] == pytest.approx(np.median(scores))
    assert v["worst"] == pytest.approx(min(scores))
    assert v["mean_ci95"][0] <= v["mean"] <= v["mean_ci95"][1]
    assert 0 <= report["tumour_slice_dice"]["value"] <= 1
    # where the shortfall lies: the mean parts add up to 1 - the mean Dice
    assert sum(report["dice_loss"]["mean"].values()) == pytest.approx(1 - v["mean"])
    assert sorted(report["dice_loss"]["per_patient"]) == sorted(report["per_patient_dice"])
    # by which sequences each patient has: every patient in one group (synthetic ones are complete)
    groups = {k: g for k, g in report["by_sequences"].items() if k != "rule"}
    assert list(groups) == ["complete"] and groups["complete"]["patients"] == sorted(report["per_patient_dice"])
    assert groups["complete"]["mean"] == pytest.approx(report["postprocessing"]["volumetric_dice"]["mean"])


def test_load_oof_reads_back_what_save_oof_wrote(tmp_path):
    for box in (None, oof.Box(1, 2, 30, 30)):
        r = oof.OutOfFold("p1", 3, np.arange(8, dtype=np.float16).reshape(2, 2, 2), np.array([4, 5]), box)
        back = oof.load_oof(oof.save_oof(r, tmp_path))
        assert (back.patient_id, back.fold, back.box) == ("p1", 3, box)
        assert np.array_equal(back.probabilities, r.probabilities) and np.array_equal(back.slice_index, [4, 5])
        assert back.flipped is None
    r = oof.OutOfFold("p2", 0, np.zeros((1, 2, 2), np.float16), np.array([1]), None, np.ones((1, 2, 2), np.float16))
    assert np.array_equal(oof.load_oof(oof.save_oof(r, tmp_path)).flipped, r.flipped)


def test_resume_skips_finished_folds_and_a_fresh_start_is_refused(cv, capsys):
    config, out = cv
    assert crossval.main(["--config", str(config), "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    before = (out / crossval.CV_FILE).read_text()
    assert crossval.main(["--config", str(config), "--out", str(out), "--resume"]) == 0
    printed = capsys.readouterr().out
    assert all(f"fold {k}: finished, skipped" in printed for k in range(FOLDS))
    assert f"python -m flaxtumor.ensemble --cv {out} --out SEGMENTER_DIR" in printed  # ship the folds themselves
    assert crossval.all_fold_command(out, 1) in printed  # or train on every patient for the folds' 1 epoch
    assert (out / crossval.CV_FILE).read_text() == before  # same models, same predictions, same report
    # A fold whose run ended before its export is resumed (it exports its best checkpoint), not retrained.
    import shutil

    shutil.rmtree(crossval.export_path(out, 1, "seg"))
    assert crossval.main(["--config", str(config), "--out", str(out), "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "fold 1 (0-based) of 2" in printed and "already finished" in printed
    assert (out / crossval.CV_FILE).read_text() == before


def test_classifier_scores_pool_slices_and_resample_patients():
    from flaxtumor.data.lgg import Patient, Slice

    def patient(pid, labels):
        return Patient(pid, tuple(Slice(pid, i + 1, None, None, bool(y)) for i, y in enumerate(labels)))

    patients = {"a": patient("a", [1, 0, 0]), "b": patient("b", [1, 1, 0])}
    results = [
        oof.OutOfFold("a", 0, np.array([0.9, 0.2, 0.6], np.float32), np.arange(1, 4)),
        oof.OutOfFold("b", 1, np.array([0.7, 0.4, 0.1], np.float32), np.arange(1, 4)),
    ]
    score = crossval.score_cls(results, patients, threshold=0.5)
    probs, labels = np.array([0.9, 0.2, 0.6, 0.7, 0.4, 0.1]), np.array([1, 0, 0, 1, 1, 0])
    assert score["auc"] == pytest.approx(M.auc(probs, labels))
    assert score["accuracy"] == pytest.approx(4 / 6)
    assert score["accuracy_ci95"][0] <= score["accuracy"] <= score["accuracy_ci95"][1]


def test_bootstrap_interval_brackets_the_statistic_and_narrows_with_more_items():
    rng = np.random.default_rng(0)
    few, many = rng.normal(0.8, 0.1, 10), rng.normal(0.8, 0.1, 1000)
    lo, hi = M.bootstrap_interval(few, np.mean)
    assert lo < np.mean(few) < hi
    lo2, hi2 = M.bootstrap_interval(many, np.mean)
    assert hi2 - lo2 < (hi - lo) / 5  # ~ 1/sqrt(n)
    # Resampling whole groups: the statistic sees each resampled group's items together.
    groups = [[1.0, 1.0], [0.0]]
    assert M.bootstrap_interval(groups, lambda gs: np.mean([x for g in gs for x in g])) == pytest.approx((0.0, 1.0))
    assert M.bootstrap_interval([], np.mean) != M.bootstrap_interval([], np.mean)  # (nan, nan)


def test_post_processing_is_chosen_on_the_out_of_fold_predictions(cv):
    _, out = cv
    report = json.loads((out / crossval.CV_FILE).read_text())
    pp = report["postprocessing"]
    assert len(pp["candidates"]) == len(crossval.postprocessing_candidates())
    assert "largest_component" not in {c["postprocess"] for c in pp["candidates"]}
    best = max(c["mean"] for c in pp["candidates"] if c["mean"] is not None)
    assert pp["chosen"]["mean"] == pytest.approx(best, abs=5e-5)
    assert pp["volumetric_dice"]["mean"] == pytest.approx(pp["chosen"]["mean"])
    assert sorted(pp["per_patient_dice"]) == sorted(report["per_patient_dice"])


def _oof_dice(out, patients, point, classifier):
    """Mean per-patient Dice of the saved out-of-fold volumes through `gate_and_postprocess` at `point`, with a
    classifier that gives every slice the probability `classifier`."""
    per_patient = {}
    for f in (out / crossval.OOF_DIR).glob("*.npz"):
        truth = np.stack([read_mask(s.mask_path) for s in patients[f.stem].slices])
        masks = np.stack([_at_size(x, t.shape) >= point.mask_threshold
                          for x, t in zip(np.load(f)["probabilities"], truth)])
        per_patient[f.stem] = M.dice(gate_and_postprocess(np.full(len(masks), classifier), masks, point)[1], truth)
    return M.summarise_patient_dice(per_patient)["mean"]


def test_the_chosen_post_processing_is_written_as_an_operating_point_that_reproduces_its_dice(cv):
    _, out = cv
    report = json.loads((out / crossval.CV_FILE).read_text())
    pp, patients = report["postprocessing"], {p.patient_id: p for p in load_dataset(tiny_config(out).data)}
    point, record = read_operating_point(out)  # the format predict, evaluate and the app read
    chosen = pp["chosen"]
    assert (point.min_tumour_area, point.gate, point.postprocess) == (
        chosen["min_tumour_area"], chosen["gate"], chosen["postprocess"])
    assert point.threshold == math.inf and not point.tta and point.mask_threshold == chosen["mask_threshold"]
    assert json.loads((out / "pipeline.json").read_text())["threshold"] is None  # strict JSON: off = null
    for classifier in (0.0, 1.0):  # the classifier is off: what it says changes nothing
        assert _oof_dice(out, patients, point, classifier) == pytest.approx(pp["volumetric_dice"]["mean"], abs=1e-12)
    # every candidate maps onto an operating point the same way: its reported Dice, with a classifier flagging all
    for row, candidate in zip(pp["candidates"], crossval.postprocessing_candidates(report["threshold"])):
        assert _oof_dice(out, patients, candidate, 1.0) == pytest.approx(row["mean"], abs=1e-12, nan_ok=True)
    tuned_on = record["tuned_on"]
    assert tuned_on["patients"] == sorted(patients) and f"{FOLDS}-fold" in tuned_on["split"]
    assert "out-of-fold" in tuned_on["split"] and "not searched" in tuned_on["classifier"]
    assert len(tuned_on["candidates"]) == len(pp["candidates"]) and "Dice" in tuned_on["criterion"]
    assert tuned_on["scores"]["volumetric_dice"]["mean_ci95"] == pp["volumetric_dice"]["mean_ci95"]
    assert record["validation"]["per_patient_dice_mean"] == pp["volumetric_dice"]["mean"]


def test_recommended_epochs_is_the_median_of_the_folds_best_epochs(cv, tmp_path):
    _, out = cv
    rec = json.loads((out / crossval.CV_FILE).read_text())["recommended_epochs"]
    assert rec["epochs"] == 1 and [f["best_epoch"] for f in rec["per_fold"]] == [1] * FOLDS  # 1-epoch folds
    for bests, expected in (([3, 7, 5], 5), ([3, 6], 5), ([2, 2, 9, 4], 3)):  # even counts: half up
        for fold, best in enumerate(bests):
            folder = crossval.export_path(tmp_path, fold, "seg")
            folder.mkdir(parents=True, exist_ok=True)
            history = [{"epoch": e} for e in range(1, best + 3)]
            (folder / "metadata.json").write_text(json.dumps({"best": {"phase": 0, "epoch": best, "step": 1},
                                                               "history": history}))
        rec = crossval.recommended_epochs(tmp_path, len(bests), "seg")
        assert rec["epochs"] == expected and [f["best_epoch"] for f in rec["per_fold"]] == bests
    # Fixed-schedule folds (--export-epoch last) export their last epoch: the schedule's length, chosen on nothing.
    for fold in range(3):
        folder = crossval.export_path(tmp_path, fold, "seg")
        (folder / "metadata.json").write_text(json.dumps({"exported": {"phase": 0, "epoch": 30, "step": 9},
                                                           "history": [{"epoch": e} for e in range(1, 31)]}))
    rec = crossval.recommended_epochs(tmp_path, 3, "seg")
    assert rec["epochs"] == 30 and "last epoch" in rec["rule"] and "held-out patients" in rec["rule"]
    # The printed command trains on every patient with the cross-validation's own config.
    from flaxtumor.train.cli import build_parser, make_config

    argv = shlex.split(crossval.all_fold_command(out, 4))[2:]  # after "python train.py"
    cfg = make_config(build_parser().parse_args(argv))
    assert (cfg.data.fold, cfg.train.epochs, cfg.train.out_dir) == ("all", 4, str(out / "fold_all"))
    assert cfg.model.resunet_widths == tiny_config(out).model.resunet_widths


def test_the_candidates_call_slices_by_area_alone_whatever_a_classifier_says():
    masks = np.zeros((3, 64, 64), bool)
    masks[0, :10, :10] = True  # 100 px: 2.4 % of the slice
    masks[1, 0, 0] = True  # 1 px: below every fused-gate area
    outcomes = set()
    for point in crossval.postprocessing_candidates(0.5):
        calls, final = gate_and_postprocess(np.zeros(3), masks, point)
        flagged = gate_and_postprocess(np.ones(3), masks, point)  # a classifier that flags every slice
        assert np.array_equal(calls, flagged[0]) and np.array_equal(final, flagged[1])
        assert calls.tolist() == ([True, False, False] if point.gate else [False] * 3)
        outcomes.add(int(final.sum()))
    assert outcomes == {101, 100}  # the 1-px mask survives only without the gate and without a component floor


def test_the_mask_threshold_is_chosen_with_the_post_processing_and_ties_keep_the_checkpoints(monkeypatch):
    """Soft tumour edges (0.45) are drawn only at the lower mask threshold, which then wins by Dice and is reported
    as a lever; where both thresholds draw the same masks, the checkpoint's own (0.5) is kept."""
    from types import SimpleNamespace

    truth = np.zeros((2, 32, 32), bool)
    truth[0, 8:18, 8:18] = True  # a 10x10 tumour on slice 0; slice 1 is tumour-free
    monkeypatch.setattr(oof, "_truth", lambda patient: list(truth))
    patients = {pid: SimpleNamespace(patient_id=pid) for pid in ("a", "b", "c")}
    confident = np.where(truth, 0.9, 0.0).astype(np.float16)
    soft = confident.copy()
    soft[0, 8:18, 8:18] = 0.45
    soft[0, 9:17, 9:17] = 0.9  # the 8x8 core is sure, its one-pixel ring is not
    assert {c.mask_threshold for c in crossval.postprocessing_candidates(0.5)} == set(crossval.MASK_THRESHOLDS)
    for probabilities, expected in ((soft, 0.4), (confident, 0.5)):
        results = [oof.OutOfFold(pid, 0, probabilities, np.arange(2)) for pid in patients]
        choice = crossval.choose_postprocessing(results, patients, 0.5)
        assert choice["point"].mask_threshold == choice["chosen"]["mask_threshold"] == expected
        raw = crossval.score_seg(results, patients, 0.5)
        scored = crossval.score_seg(results, patients, 0.5, point=choice["point"])
        assert scored["volumetric_dice"]["mean"] == pytest.approx(1.0)
        levers = crossval.levers(results, patients, 0.5, choice["point"], raw, scored)
        if expected == 0.5:
            assert "mask_threshold" not in levers
            continue
        assert raw["volumetric_dice"]["mean"] == pytest.approx(2 * 64 / (64 + 100))  # the core alone at 0.5
        lever = levers["mask_threshold"]
        assert lever["mean_difference"] == pytest.approx(1 - 2 * 64 / (64 + 100)) and lever["better"] == 3
        assert "0.5" in lever["versus"]


def test_out_of_fold_masks_go_back_through_the_crop_the_model_saw(tmp_path):
    """A brain-cropped fold model predicts in the crop's frame: its masks land inside the box at the slices' size."""
    from types import SimpleNamespace

    from flaxtumor.data.preprocess import Box

    patient = SimpleNamespace(slices=[SimpleNamespace(mask_path=None)] * 2)  # no truth: empty 40x40 masks
    probs = np.ones((2, 4, 4), np.float16)
    result = oof.OutOfFold("p", 0, probs, np.arange(2), Box(8, 4, 20, 20))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(oof, "_truth", lambda p: [np.zeros((40, 40), bool)] * 2)
        preds, _ = oof.oof_masks(result, patient, 0.5)
    expected = np.zeros((40, 40), bool)
    expected[8:28, 4:24] = True
    assert preds.shape == (2, 40, 40) and (preds == expected).all()
    saved = np.load(oof.save_oof(result, tmp_path))
    assert tuple(saved["box"]) == (8, 4, 20, 20)


def test_a_preview_scores_the_finished_folds_only_and_writes_nothing_final(cv, tmp_path, capsys):
    import shutil

    _, out = cv
    partial = tmp_path / "partial"
    shutil.copytree(out, partial)
    for final in (crossval.CV_FILE, "pipeline.json", crossval.OOF_DIR):
        shutil.rmtree(partial / final) if (partial / final).is_dir() else (partial / final).unlink()
    shutil.rmtree(crossval.export_path(partial, 1, "seg"))  # fold 1 still "training"
    assert crossval.main(["--out", str(partial), "--preview"]) == 0
    assert "PREVIEW, 1 of 2 folds finished" in capsys.readouterr().out
    preview = json.loads((partial / crossval.PREVIEW_FILE).read_text())
    held = load_split(crossval.fold_dir(partial, 0) / "split.json").val
    assert sorted(preview["per_patient_dice"]) == sorted(held) and preview["n_patients"] == len(held)
    assert [f["fold"] for f in preview["recommended_epochs"]["per_fold"]] == [0]
    assert not (partial / crossval.CV_FILE).exists() and not (partial / "pipeline.json").exists()
    assert not any((partial / crossval.OOF_DIR).glob("*.npz"))
    shutil.rmtree(crossval.export_path(partial, 0, "seg"))
    assert crossval.main(["--out", str(partial), "--preview"]) == 2
    assert "no fold has finished" in capsys.readouterr().err


def test_a_rescore_reads_the_saved_predictions_back_and_predicts_nothing(cv, tmp_path, capsys, monkeypatch):
    import os
    import shutil

    _, out = cv
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    before = (copy / crossval.CV_FILE).read_text().replace(str(out), str(copy))
    (copy / crossval.CV_FILE).unlink()

    def no_model(*args, **kwargs):
        raise AssertionError("--rescore ran a model")

    monkeypatch.setattr(crossval, "predict_fold", no_model)
    assert crossval.main(["--out", str(copy), "--rescore"]) == 0
    assert "held-out patients read back" in capsys.readouterr().out
    assert (copy / crossval.CV_FILE).read_text() == before  # the same predictions give the same report
    # A saved prediction older than its fold model (retrained since) or missing is an error naming the file.
    pid = sorted(p.stem for p in (copy / crossval.OOF_DIR).glob("*.npz"))[0]
    npz = copy / crossval.OOF_DIR / f"{pid}.npz"
    # every fold model "retrained" after the newest saved prediction (on a loaded machine they can be minutes apart)
    made = max(f.stat().st_mtime for f in (copy / crossval.OOF_DIR).glob("*.npz")) + 60
    for fold in range(FOLDS):
        os.utime(crossval.export_path(copy, fold, "seg") / "metadata.json", (made, made))
    assert crossval.main(["--out", str(copy), "--rescore"]) == 2
    err = capsys.readouterr().err
    assert "older than" in err and ".npz" in err
    npz.unlink()
    assert crossval.main(["--out", str(copy), "--rescore"]) == 2
    assert f"{pid}.npz: no saved out-of-fold prediction" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        crossval.main(["--out", str(copy), "--rescore", "--preview"])
    assert "choose one" in capsys.readouterr().err

"""`python -m flaxtumor.evaluate`: metrics.json (with its protocol) and the PNGs, on tiny checkpoints."""

import json
import logging
import shutil

import numpy as np
import pytest

from flaxtumor import metrics
from flaxtumor.data.io import read_mask
from flaxtumor.data.lgg import discover
from flaxtumor.evaluate import main
from tests.fixtures_checkpoints import tiny  # noqa: F401  (session fixture)

PLOTS = ("confusion_matrix.png", "roc.png", "reliability.png", "patient_dice.png", "gallery.png")


def _strict_json(path):
    def refuse(token):
        raise ValueError(f"non-standard JSON constant {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_default_is_the_checkpoint_val_split_with_protocol_and_plots(tiny, tmp_path):  # noqa: F811
    out = tmp_path / "eval"
    assert main(["--data", str(tiny.data), "--checkpoints", str(tiny.checkpoints), "--out", str(out)]) == 0
    m = _strict_json(out / "metrics.json")
    protocol = m["protocol"]
    assert protocol["patients"] == list(tiny.val) and protocol["patients_from"] == "segmenter checkpoint (val)"
    assert protocol["threshold"] == 0.5 and protocol["threshold_from"] == "classifier checkpoint"
    assert protocol["lcc"] is False and protocol["tta"] is False and protocol["gate"] is True
    assert "never 1" in protocol["empty_slice_rule"] and "pooled" in protocol["pooled_rule"]
    assert protocol["n_slices"] == 12 and protocol["classifier_train_overlap"] == []
    keys = ("accuracy", "precision", "recall", "sensitivity", "specificity", "f1", "auc", "ece", "confusion_matrix")
    assert set(keys) <= set(m["classifier"])
    assert sum(map(sum, m["classifier"]["confusion_matrix"])) == 12
    # Grad-CAM pointing is scored on exactly the validation slices with >= 200 true pixels.
    from flaxtumor.data.io import read_mask
    from flaxtumor.data.lgg import discover

    large = sum(int(read_mask(s.mask_path).sum() >= 200) for p in discover(tiny.data) if p.patient_id in tiny.val
                for s in p.slices)
    pointing = m["classifier"]["gradcam"]
    assert pointing["pointing_slices"] == large and pointing["pointing_min_pixels"] == 200
    # The tiny set's tumours are all smaller than that: no slice qualifies, so the score is missing, never 0 or 1.
    assert large == 0 and pointing["pointing_score"] is None
    assert set(m["segmenter"]) >= {"dice_mean", "iou_mean", "pooled_dice", "pooled_iou", "n_slices"}
    assert m["segmenter"]["n_slices"] == protocol["n_tumour_slices"]
    assert set(m["segmenter"]["all_slices"]) == {"per_patient_dice", "tumour_slice_dice", "pooled_dice"}
    pipe = m["pipeline"]
    assert set(pipe["per_patient_dice"]) >= {"mean", "median", "min", "n_scored", "empty_both_patients"}
    assert set(pipe["per_patient"]) == set(tiny.val)
    # where each patient's Dice went: the parts add up to 1 - its Dice (an empty-vs-empty patient: all null)
    loss = pipe["dice_loss"]
    assert set(loss["per_patient"]) == set(tiny.val) and set(loss["mean"]) == set(metrics.DICE_LOSS_PARTS)
    for pid, parts in loss["per_patient"].items():
        if pipe["per_patient"][pid] is not None:
            assert sum(parts.values()) == pytest.approx(1 - pipe["per_patient"][pid])
    assert {"tumour_slice_dice", "pooled_dice", "pooled_iou", "pooled_pixel_accuracy"} <= set(pipe)
    verdict = pipe["verdict"]  # what a user is told, scored beside the raw classifier
    assert sum(verdict["counts"].values()) == 12 == verdict["tn"] + verdict["fp"] + verdict["fn"] + verdict["tp"]
    assert verdict["counts"]["tumour"] == verdict["tp"] + verdict["fp"]
    assert m["checkpoint_metrics"]["segmenter"] == {"note": "untrained test model"}
    assert m["plots"] == list(PLOTS)
    for name in PLOTS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_known_answer_when_every_slice_is_fully_segmented(tiny, tmp_path):  # noqa: F811
    # threshold 0 passes every slice and the fixture's segmenter marks every pixel: Dice is then 2|T| / (|T| + all)
    pid = tiny.val[1]
    out = tmp_path / "eval"
    args = ["--data", str(tiny.data), "--checkpoints", str(tiny.checkpoints), "--out", str(out),
            "--patients", pid, "--threshold", "0", "--lcc", "--tta", "--gallery", "2"]
    assert main(args) == 0
    m = _strict_json(out / "metrics.json")
    (patient,) = [p for p in discover(tiny.data) if p.patient_id == pid]
    target = np.stack([read_mask(s.mask_path) for s in patient.slices])
    expected = metrics.dice(np.ones_like(target), target)
    assert m["pipeline"]["per_patient"][pid] == pytest.approx(expected)
    assert m["pipeline"]["by_sequences"]["complete"]["patients"] == [pid]  # synthetic slices have three sequences
    assert m["pipeline"]["pooled_dice"] == pytest.approx(expected)
    assert m["pipeline"]["pooled_pixel_accuracy"] == pytest.approx(target.mean())
    slice_dice = metrics.tumour_slice_dice(list(np.ones_like(target)), list(target))
    assert m["pipeline"]["tumour_slice_dice"] == pytest.approx(slice_dice)
    assert m["classifier"]["recall"] == 1.0 and m["classifier"]["specificity"] == 0.0
    assert m["protocol"]["patients_from"] == "--patients" and m["protocol"]["patients"] == [pid]
    assert m["protocol"]["lcc"] is True and m["protocol"]["tta"] is True and m["protocol"]["threshold"] == 0.0


def test_split_file_and_errors(tiny, tmp_path, capsys):  # noqa: F811
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": list(tiny.val), "val": [], "test": [], "seed": 0}))
    base = ["--data", str(tiny.data), "--checkpoints", str(tiny.checkpoints), "--out", str(tmp_path / "o")]
    assert main(base + ["--split", str(split)]) == 2
    assert "val subset" in capsys.readouterr().err
    assert main(base + ["--patients", "TCGA_NO_0000_20000101"]) == 2
    assert "not in the dataset" in capsys.readouterr().err
    assert main(["--data", str(tmp_path / "nodata"), "--checkpoints", str(tiny.checkpoints), "--out", "x"]) == 2
    assert "not found" in capsys.readouterr().err


def test_a_checkpoint_without_validation_patients_says_to_pass_patients(tiny, tmp_path, capsys):  # noqa: F811
    import shutil

    checkpoints = tmp_path / "checkpoints"  # as train.py --fold all records it: every patient trains
    shutil.copytree(tiny.checkpoints, checkpoints)
    meta_file = checkpoints / "segmenter" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    meta["split"] = {**meta["split"], "train": meta["split"]["train"] + meta["split"]["val"], "val": []}
    meta_file.write_text(json.dumps(meta))
    assert main(["--data", str(tiny.data), "--checkpoints", str(checkpoints), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(checkpoints / "segmenter") in err and "--patients" in err
    # Scoring it on patients it trained on works, with a warning and the overlap recorded: its scores flatter it.
    out = tmp_path / "o"
    assert main(["--data", str(tiny.data), "--checkpoints", str(checkpoints), "--out", str(out),
                 "--patients", *tiny.val]) == 0
    err = capsys.readouterr().err
    assert f"warning: {len(tiny.val)} evaluated patient(s) trained the segmenter" in err and "optimistic" in err
    assert "trained the classifier" not in err
    protocol = json.loads((out / "metrics.json").read_text())["protocol"]
    assert protocol["segmenter_train_overlap"] == sorted(tiny.val) and protocol["classifier_train_overlap"] == []


def test_no_gate_pipeline_equals_the_segmenter_on_all_slices(tiny, tmp_path):  # noqa: F811
    out = tmp_path / "eval"
    args = ["--data", str(tiny.data), "--checkpoints", str(tiny.checkpoints), "--out", str(out), "--no-gate"]
    assert main(args) == 0
    m = _strict_json(out / "metrics.json")
    assert m["protocol"]["gate"] is False
    ungated = m["segmenter"]["all_slices"]
    assert m["pipeline"]["per_patient_dice"] == ungated["per_patient_dice"]
    assert m["pipeline"]["tumour_slice_dice"] == ungated["tumour_slice_dice"]


def test_data_synthetic_scores_every_synthetic_patient_without_a_phantom(tiny, tmp_path, monkeypatch, capsys,  # noqa: F811
                                                                          caplog):
    # Like the shipped checkpoints: the recorded split names real patients that a synthetic set does not hold.
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(tiny.checkpoints, checkpoints)
    meta_file = checkpoints / "segmenter" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    meta["split"] = {"train": ["TCGA_CS_4941_19960909"], "val": ["TCGA_CS_4942_19970222"], "test": [], "seed": 0}
    meta_file.write_text(json.dumps(meta))
    monkeypatch.setenv("FLAXTUMOR_CACHE", str(tmp_path / "cache"))
    caplog.set_level(logging.INFO, logger="flaxtumor.data.lgg")
    out = tmp_path / "eval"
    assert main(["--data", "synthetic", "--checkpoints", str(checkpoints), "--out", str(out)]) == 0
    m = _strict_json(out / "metrics.json")
    assert m["protocol"]["n_patients"] == 6 and m["protocol"]["patients_from"].startswith("all synthetic patients")
    assert "evaluating all 6 synthetic patients" in capsys.readouterr().err
    assert "listed without a folder" not in caplog.text  # the generator's data.csv lists exactly its patients
    # on real data the same mismatch stays an error that says what to pass
    assert main(["--data", str(tiny.data), "--checkpoints", str(checkpoints), "--out", str(out)]) == 2
    assert "pass --split FILE or --patients" in capsys.readouterr().err


def test_missing_checkpoints_name_the_flag_and_the_folder_to_run_from(tiny, tmp_path, capsys):  # noqa: F811
    assert main(["--data", str(tiny.data), "--checkpoints", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--checkpoints" in err and "repository root" in err and "train.py" not in err


def test_with_the_classifier_off_its_metrics_are_taken_at_its_own_threshold(tiny, tmp_path):  # noqa: F811
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(tiny.checkpoints, checkpoints)
    (checkpoints / "pipeline.json").write_text(json.dumps({"threshold": None, "gate": False}))  # as crossval writes
    out = tmp_path / "eval"
    assert main(["--data", str(tiny.data), "--checkpoints", str(checkpoints), "--out", str(out)]) == 0
    m = _strict_json(out / "metrics.json")
    assert m["protocol"]["threshold"] is None  # the pipeline flags nothing by the classifier...
    c = m["classifier"]
    assert c["threshold"] == 0.5 and "classifier is off" in c["threshold_from"]  # ...its metrics use its own 0.5
    assert sum(map(sum, c["confusion_matrix"])) == 12
    baseline = tmp_path / "base"
    assert main(["--data", str(tiny.data), "--checkpoints", str(tiny.checkpoints), "--out", str(baseline)]) == 0
    on = _strict_json(baseline / "metrics.json")["classifier"]
    assert on["threshold_from"] == "pipeline" and on["confusion_matrix"] == c["confusion_matrix"]  # same 0.5 either way

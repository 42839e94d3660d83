"""The cross-validation of an ensemble (`flaxtumor.crossval_ensemble`) on two tiny cross-validations of one recipe,
seeds 0 and 1: every patient predicted once, by the average of the two fold models that held it out, scored as
`crossval` scores one model; members that do not share their folds, or a fold model that trained on the patients it
is asked about, are refused by name."""

import json
import shutil

import numpy as np
import pytest

from flaxtumor import crossval as CV
from flaxtumor import oof
from flaxtumor import crossval_ensemble as E
from flaxtumor.data.preprocess import Box
from tests.train.helpers import CV_FOLDS, tiny_crossval


@pytest.fixture(scope="module")
def members(tiny_cv, tmp_path_factory):
    _, seed0 = tiny_cv
    _, seed1 = tiny_crossval(tmp_path_factory.mktemp("cv_seed1"), **{"train.seed": 1})
    return seed0, seed1


@pytest.fixture(scope="module")
def ensemble(members, tmp_path_factory):
    out = tmp_path_factory.mktemp("ensemble") / "cv"
    assert E.main(["--members", *map(str, members), "--out", str(out)]) == 0
    return out


def _oof(out, pid):
    return oof.load_oof(out / CV.OOF_DIR / f"{pid}.npz")


def test_average_oof_averages_probabilities_and_flips_and_refuses_other_crops():
    def one(p, flipped=None, box=None):
        v = np.full((2, 4, 4), p, np.float16)
        return oof.OutOfFold("P", 0, v, np.arange(2), box, None if flipped is None else np.full_like(v, flipped))

    (mean,) = E.average_oof([[one(0.2, 0.4)], [one(0.6, 0.8)]])
    assert np.allclose(mean.probabilities, 0.4, atol=1e-3) and np.allclose(mean.flipped, 0.6, atol=1e-3)
    assert E.average_oof([[one(0.2, 0.4)], [one(0.6)]])[0].flipped is None  # TTA only where every model has it
    with pytest.raises(ValueError, match="crop box"):
        E.average_oof([[one(0.2, box=Box(0, 0, 4, 4))], [one(0.6, box=Box(1, 0, 3, 4))]])


def test_every_patient_is_predicted_once_by_the_average_of_its_fold_models(members, ensemble):
    seed0, seed1 = members
    single = json.loads((seed0 / CV.CV_FILE).read_text())
    report = json.loads((ensemble / CV.CV_FILE).read_text())
    assert report["fold_of"] == single["fold_of"] and report["n_patients"] == len(single["fold_of"])
    assert report["members"] == [str(seed0), str(seed1)] and report["member_seeds"] == [0, 1]
    assert "average of the 2 members' fold models" in report["protocol"]
    assert sorted(p.stem for p in (ensemble / CV.OOF_DIR).glob("*.npz")) == sorted(single["fold_of"])
    differ = 0
    for pid, fold in report["fold_of"].items():
        a, b, both = _oof(seed0, pid), _oof(seed1, pid), _oof(ensemble, pid)
        assert both.fold == fold and both.probabilities.dtype == np.float16
        for field in ("probabilities", "flipped"):
            mean = (getattr(a, field).astype(np.float32) + getattr(b, field).astype(np.float32)) / 2
            assert np.allclose(getattr(both, field), mean, atol=1e-3)
        differ += not np.allclose(a.probabilities, b.probabilities, atol=1e-3)
    assert differ  # two seeds, two models: the average is not either one
    # scored as crossval scores one model, and its post-processing written as an operating point
    assert set(report) >= {"volumetric_dice", "tumour_slice_dice", "postprocessing", "levers", "recommended_epochs"}
    assert json.loads((ensemble / "pipeline.json").read_text())["tuned_on"]["split"].count("average of the 2")


def test_an_ensemble_of_a_cross_validation_with_itself_scores_as_that_cross_validation(members, tmp_path):
    seed0, _ = members
    twin, out = tmp_path / "twin", tmp_path / "out"
    shutil.copytree(seed0, twin)
    assert E.main(["--members", str(seed0), str(twin), "--out", str(out)]) == 0
    single = json.loads((seed0 / CV.CV_FILE).read_text())
    report = json.loads((out / CV.CV_FILE).read_text())
    assert report["per_patient_dice"] == single["per_patient_dice"]
    assert report["postprocessing"]["chosen"] == single["postprocessing"]["chosen"]


def test_a_preview_scores_the_folds_every_member_finished(members, tmp_path, capsys):
    seed0, seed1 = members
    partial, out = tmp_path / "partial", tmp_path / "out"
    shutil.copytree(seed1, partial)
    shutil.rmtree(CV.export_path(partial, 1, "seg"))  # fold 1 still training
    assert E.main(["--members", str(seed0), str(partial), "--out", str(out)]) == 2
    assert f"{partial}: fold 1 has no exported model" in capsys.readouterr().err
    assert E.main(["--members", str(seed0), str(partial), "--out", str(out), "--preview"]) == 0
    preview = json.loads((out / CV.PREVIEW_FILE).read_text())
    held = [pid for pid, k in preview["fold_of"].items() if k == 0]
    assert sorted(preview["per_patient_dice"]) == sorted(held) and "1 of 2 folds" in preview["preview"]
    assert not (out / CV.CV_FILE).exists() and not (out / "pipeline.json").exists()
    assert not (out / CV.OOF_DIR).exists()


def test_members_that_do_not_share_their_folds_are_refused_by_name(members, tmp_path, capsys):
    seed0, seed1 = members
    # another fold count
    other = tmp_path / "other"
    shutil.copytree(seed1, other)
    config = json.loads((other / "config.json").read_text())
    config["data"]["folds"] = CV_FOLDS + 1
    (other / "config.json").write_text(json.dumps(config))
    assert E.main(["--members", str(seed0), str(other), "--out", str(tmp_path / "o1")]) == 2
    assert f"{other}: 3 folds" in capsys.readouterr().err
    # a fold holding out other patients
    moved = tmp_path / "moved"
    shutil.copytree(seed1, moved)
    splits = [json.loads((CV.fold_dir(moved, k) / "split.json").read_text()) for k in range(CV_FOLDS)]
    p0, p1 = splits[0]["val"][0], splits[1]["val"][0]  # trade one held-out patient between the folds
    swap = {p0: p1, p1: p0}
    for split in splits:
        split["val"], split["train"] = ([swap.get(pid, pid) for pid in split[key]] for key in ("val", "train"))
    for k in range(CV_FOLDS):
        (CV.fold_dir(moved, k) / "split.json").write_text(json.dumps(splits[k]))
    assert E.main(["--members", str(seed0), str(moved), "--out", str(tmp_path / "o2")]) == 2
    assert f"{moved}: its folds hold out other patients" in capsys.readouterr().err


def test_a_fold_model_that_trained_on_the_held_out_patients_is_refused(members, tmp_path, capsys):
    seed0, seed1 = members
    swapped = tmp_path / "swapped"
    shutil.copytree(seed1, swapped)
    a, b = CV.export_path(swapped, 0, "seg"), CV.export_path(swapped, 1, "seg")
    a.rename(tmp_path / "tmp"), b.rename(a), (tmp_path / "tmp").rename(b)  # each fold's model trained on the other's
    assert E.main(["--members", str(seed0), str(swapped), "--out", str(tmp_path / "o")]) == 2
    assert "trained on" in capsys.readouterr().err


def test_the_classifier_gate_is_decided_on_the_ensembles_out_of_fold_masks(ensemble, tmp_path, capsys):
    from flaxtumor import classifier_gate as G
    from tests.fixtures_checkpoints import export_tiny

    ids = sorted(json.loads((ensemble / CV.CV_FILE).read_text())["fold_of"])
    checkpoints = tmp_path / "checkpoints"
    export_tiny(checkpoints / "classifier", "cls", "image_zscore", 0.5,
                {"train": ids[:2], "val": ids[2:], "test": [], "seed": 0})
    out = tmp_path / "gate.json"
    assert G.main(["--cv", str(ensemble), "--data", "synthetic", "--checkpoints", str(checkpoints),
                   "--out", str(out)]) == 0
    assert json.loads(out.read_text())["classifier_gate"]["patients"] == ids[2:]

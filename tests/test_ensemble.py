"""Fold ensembles: built from a tiny cross-validation, loaded by the pipeline, probabilities averaged, bad folders
refused by name."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from flaxtumor import ensemble as E
from flaxtumor.checkpoint_metadata import CheckpointError, read_metadata
from flaxtumor.inference import Pipeline
from tests.fixtures_checkpoints import export_tiny


class Constant:
    """A stand-in member: every probability is `value`."""

    batch_size, image_size, channels = 4, 8, 3

    def __init__(self, value: float):
        self.value, self.prepared = value, 0

    def prepare(self, tta: bool) -> bool:
        self.prepared += 1
        return self.value != 0.5  # one member "misses" the cache

    def compile(self, tta: bool) -> None:
        pass

    def __call__(self, x: np.ndarray, tta: bool) -> np.ndarray:
        return np.full((len(x), 8, 8, 1), self.value, np.float32)


def test_the_ensemble_averages_its_members_and_prepares_every_one():
    members = [Constant(0.2), Constant(0.5), Constant(0.8)]
    model = E.EnsembleModel(members)
    assert not model.prepare(False)  # one miss: not all cached
    assert [m.prepared for m in members] == [1, 1, 1]  # the member after the miss was prepared too
    np.testing.assert_allclose(model(np.zeros((2, 8, 8, 3)), False), 0.5, atol=1e-6)
    with pytest.raises(ValueError):
        E.EnsembleModel([])


@pytest.fixture(scope="module")
def tiny_cv(tmp_path_factory):
    """A 2-fold tiny cross-validation, trained for one epoch."""
    from flaxtumor import crossval
    from tests.train.helpers import tiny_config

    root = tmp_path_factory.mktemp("ens")
    config = root / "tiny.json"
    tiny_config(root / "unused", "seg", **{"train.epochs": 1, "data.folds": 2}).to_json(config)
    assert crossval.main(["--config", str(config), "--out", str(root / "cv")]) == 0
    return root


@pytest.fixture(scope="module")
def shipped(tiny_cv):
    """checkpoints/ with the folds' bf16 ensemble as the segmenter and a tiny classifier."""
    checkpoints = tiny_cv / "checkpoints"
    E.build(tiny_cv / "cv", checkpoints / "segmenter", bf16=True)
    ids = read_metadata(checkpoints / "segmenter").extra["trained_patients"]
    export_tiny(checkpoints / "classifier", "cls", "image_zscore", 0.5, {"train": ids, "val": [], "test": []})
    return checkpoints


def test_the_command_writes_an_ensemble_of_every_fold(tiny_cv, tmp_path, capsys):
    assert E.main(["--cv", str(tiny_cv / "cv"), "--out", str(tmp_path / "segmenter"), "--bf16"]) == 0
    assert "2 members (2 fold models), bfloat16" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "segmenter").iterdir()) == ["fold_0", "fold_1", "metadata.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["segmenter"]  # no temporary folder left behind


def test_an_ensemble_of_the_folds_is_what_the_pipeline_loads(tiny_cv, shipped):
    cv, checkpoints = tiny_cv / "cv", shipped
    meta = read_metadata(checkpoints / "segmenter")
    folds = [json.loads((cv / f"fold_{k}" / "split.json").read_text()) for k in range(2)]
    assert meta.extra["trained_patients"] == sorted({p for f in folds for p in f["train"]})
    assert meta.split == {"seed": meta.split["seed"], "train": meta.extra["trained_patients"]}  # nobody held out
    assert meta.extra["ensemble"]["held_out"] == {f"fold_{k}": folds[k]["val"] for k in range(2)}
    assert meta.config.data.fold is None and meta.dtype == "bfloat16"
    assert "mean" in meta.metrics["crossval"]

    pipeline = Pipeline.from_checkpoints(checkpoints)
    assert isinstance(pipeline._segment, E.EnsembleModel) and len(pipeline._segment.members) == 2
    assert pipeline.summary()["models"]["segmenter"]["ensemble"]["members"] == ["fold_0", "fold_1"]
    from flaxtumor.app.model_card import model_card_markdown

    assert "| ensemble | 2 fold models; mean of the members' tumour probabilities" in \
        model_card_markdown(pipeline.summary())
    x = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
    singles = [Pipeline.from_checkpoints(checkpoints, segmenter=checkpoints / "segmenter" / f"fold_{k}")._segment
               for k in range(2)]
    np.testing.assert_allclose(pipeline._segment(x, False), (singles[0](x, False) + singles[1](x, False)) / 2,
                               atol=1e-6)
    # the bf16 members are the fold models, rounded: their outputs stay within bf16 precision of the originals
    original = Pipeline.from_checkpoints(checkpoints, segmenter=cv / "fold_0" / "segmenter")._segment
    np.testing.assert_allclose(singles[0](x, False), original(x, False), atol=0.02)


def test_a_broken_ensemble_folder_fails_naming_the_file(shipped, tmp_path):
    src = shipped
    bad = tmp_path / "checkpoints"
    shutil.copytree(src, bad)
    shutil.rmtree(bad / "segmenter" / "fold_1")
    with pytest.raises(CheckpointError, match=r"segmenter/metadata.json: ensemble member folder\(s\) missing: fold_1"):
        Pipeline.from_checkpoints(bad)
    shutil.copytree(src / "segmenter" / "fold_1", bad / "segmenter" / "fold_1")
    member = bad / "segmenter" / "fold_1" / "metadata.json"
    m = json.loads(member.read_text())
    m["preprocessing"]["image_size"] = 64
    member.write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=r"fold_1/metadata.json: preprocessing .* differs from the ensemble's"):
        Pipeline.from_checkpoints(bad)
    top = bad / "segmenter" / "metadata.json"
    m = json.loads(top.read_text())
    m["ensemble"]["members"] = ["../classifier"]
    top.write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="must be a non-empty list of sub-folder names"):
        Pipeline.from_checkpoints(bad)


def test_an_unfinished_cross_validation_is_refused(tiny_cv, tmp_path, capsys):
    cv = tmp_path / "cv"
    shutil.copytree(tiny_cv / "cv", cv)
    shutil.rmtree(cv / "fold_1" / "segmenter")
    assert E.main(["--cv", str(cv), "--out", str(tmp_path / "segmenter")]) == 2
    assert "only folds [0] of 2 are finished" in capsys.readouterr().err
    assert not (tmp_path / "segmenter").exists()


@pytest.fixture(scope="module")
def seed_runs(tmp_path_factory):
    """Two tiny all-patient runs of one recipe, seeds 0 and 1, and a third at another image size."""
    from flaxtumor.train import loop
    from tests.train.helpers import tiny_config

    root = tmp_path_factory.mktemp("seeds")
    for name, seed, size in (("seed0", 0, 32), ("seed1", 1, 32), ("size64", 0, 64)):
        loop.run(tiny_config(root / name, "seg", **{"train.epochs": 1, "data.fold": "all", "train.seed": seed,
                                                     "data.image_size": size}))
    return root


def test_members_of_one_recipe_make_an_ensemble_the_pipeline_loads(seed_runs, tiny_cv, tmp_path, capsys):
    out = tmp_path / "checkpoints" / "segmenter"
    report = tiny_cv / "cv" / "crossval.json"
    assert E.main(["--members", str(seed_runs / "seed0"), str(seed_runs / "seed1" / "segmenter"),
                   "--crossval", str(report), "--out", str(out)]) == 0
    assert "2 members (2 all-patient models (seeds 0, 1)), float32" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["member_0", "member_1", "metadata.json"]
    meta = read_metadata(out)
    assert meta.extra["ensemble"]["held_out"] == {"member_0": [], "member_1": []}
    assert meta.metrics["crossval"]["mean"] == json.loads(report.read_text())["postprocessing"]["volumetric_dice"][
        "mean"]
    assert "one model per fold" in meta.metrics["protocol"]
    seeds_cv = tmp_path / "seeds_crossval.json"  # a seed ensemble's cross-validation (crossval_ensemble) says so
    seeds_cv.write_text(json.dumps({**json.loads(report.read_text()), "members": ["runs/cv", "runs/cv_seed1"]}))
    again = tmp_path / "again"
    assert E.main(["--members", str(seed_runs / "seed0"), str(seed_runs / "seed1"), "--crossval", str(seeds_cv),
                   "--out", str(again)]) == 0
    assert "each fold's 2 models (one per seed) averaged" in read_metadata(again).metrics["protocol"]
    ids = meta.extra["trained_patients"]
    export_tiny(out.parent / "classifier", "cls", "image_zscore", 0.5, {"train": ids, "val": [], "test": []})
    pipeline = Pipeline.from_checkpoints(out.parent)
    x = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
    singles = [Pipeline.from_checkpoints(out.parent, segmenter=seed_runs / s / "segmenter")._segment
               for s in ("seed0", "seed1")]
    np.testing.assert_allclose(pipeline._segment(x, False), (singles[0](x, False) + singles[1](x, False)) / 2,
                               atol=1e-6)
    from flaxtumor.app.model_card import model_card_markdown

    assert "| ensemble | 2 all-patient models (seeds 0, 1); mean" in model_card_markdown(pipeline.summary())


def test_members_that_cannot_be_averaged_are_refused_by_name(seed_runs, tmp_path, capsys):
    out = tmp_path / "segmenter"
    assert E.main(["--members", str(seed_runs / "seed0"), str(seed_runs / "size64"), "--out", str(out)]) == 2
    assert f"{seed_runs / 'size64' / 'segmenter' / 'metadata.json'}: preprocessing" in capsys.readouterr().err
    assert E.main(["--members", str(seed_runs / "seed0"), "--out", str(out)]) == 2
    assert "at least two members" in capsys.readouterr().err
    assert E.main(["--members", str(seed_runs / "seed0"), str(tmp_path), "--out", str(out)]) == 2
    assert f"{tmp_path}: not a segmenter checkpoint" in capsys.readouterr().err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []  # nothing half-written left behind
    with pytest.raises(SystemExit):
        E.main(["--crossval", "x.json", "--out", str(out)])

"""`--fold all` (nnU-Net's all fold): every patient trains, nothing is validated, no epoch is "best", and the export is
the last epoch, also after an interruption and --resume. A split without validation patients needs --fold all.
`--export-epoch last` (nnU-Net's fixed schedule): the validation patients are scored for the record, choose nothing,
and the last epoch is exported."""

import json
from pathlib import Path

import pytest

from flaxtumor.data.io import DataError
from flaxtumor.data.lgg import load_dataset
from flaxtumor.train import loop
from flaxtumor.train.checkpoint import TrainCheckpoints
from flaxtumor.train.selection import BestOnValidation, LastEpoch, make_selection
from tests.train.helpers import tiny_config

ALL = {"data.fold": "all", "train.patience": 1}  # patience 1 would stop a validated run at its first flat epoch
STEPS = 15  # 6 synthetic patients x 20 slices, all training, / batch 8


def _metadata(summary: dict) -> dict:
    return json.loads((Path(summary["checkpoint"]) / "metadata.json").read_text())


def test_fold_all_trains_every_patient_for_exactly_its_epochs_and_exports_the_last(tmp_path):
    cfg = tiny_config(tmp_path, "seg", **ALL, **{"train.epochs": 3})
    summary = loop.run(cfg)
    everyone = sorted(p.patient_id for p in load_dataset(cfg.data))
    history = summary["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]  # no early stop, whatever patience says
    assert not any(k.startswith("val_") for h in history for k in h)
    assert summary["exported_step"] == history[-1]["step"] == 3 * STEPS and summary["metric"] is None
    assert summary["trained_patients"] == everyone  # the leakage guard's record: what reached the batches
    assert json.loads((tmp_path / "split.json").read_text())["train"] == everyone
    meta = _metadata(summary)
    assert meta["split"]["train"] == everyone and meta["split"]["val"] == meta["split"]["test"] == []
    assert meta["trained_patients"] == everyone
    assert list(meta["metrics"]) == ["protocol"] and "no held-out patients" in meta["metrics"]["protocol"]
    assert "crossval.json" in meta["metrics"]["protocol"]
    assert "best" not in meta and meta["exported"]["step"] == 3 * STEPS and meta["exported"]["epoch"] == 3
    assert json.loads((tmp_path / "config.json").read_text())["data"]["fold"] == "all"


def test_fold_all_resumes_and_exports_its_last_finished_epoch(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, "seg", **ALL, **{"train.epochs": 2, "train.save_every_steps": 4})
    save = TrainCheckpoints.save

    def killed_mid_epoch_two(self, step, *args, **kwargs):
        save(self, step, *args, **kwargs)
        if step == 20:  # a mid-epoch save (every 4 steps) of epoch 2, which runs from step 16 to 30
            self.manager.wait_until_finished()
            raise KeyboardInterrupt

    monkeypatch.setattr(TrainCheckpoints, "save", killed_mid_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        loop.run(cfg)
    monkeypatch.setattr(TrainCheckpoints, "save", save)
    # Stopped now (--epochs 1 < the 1 epoch done + part of one): the last *finished* epoch is exported, kept although
    # a newer mid-epoch checkpoint exists.
    stopped = loop.run(cfg.override(**{"train.epochs": 1, "train.resume": True}))
    assert stopped["exported_step"] == STEPS and _metadata(stopped)["exported"]["epoch"] == 1
    # Continued: epoch 2 finishes from its mid-epoch checkpoint and is the export.
    resumed = loop.run(cfg.override(**{"train.resume": True}))
    assert [h["step"] for h in resumed["history"]] == [STEPS, 2 * STEPS]
    assert resumed["exported_step"] == 2 * STEPS and _metadata(resumed)["exported"]["epoch"] == 2


def test_an_empty_validation_set_without_fold_all_is_refused(tmp_path):
    split = tmp_path / "split.json"
    ids = sorted(p.patient_id for p in load_dataset(tiny_config(tmp_path).data))
    split.write_text(json.dumps({"seed": 0, "train": ids[:-1], "val": [], "test": ids[-1:]}))
    with pytest.raises(DataError, match="no validation patients.*--fold all"):
        loop.run(tiny_config(tmp_path / "run", "seg", **{"data.split_file": str(split)}))


def test_the_selection_follows_the_fold_and_refuses_a_mismatched_split(tmp_path):
    cfg = tiny_config(tmp_path)
    patients = load_dataset(cfg.data)[:1]
    assert isinstance(make_selection(cfg.override(**{"data.fold": "all"}), []), LastEpoch)
    assert isinstance(make_selection(cfg.override(**{"data.fold": 0}), patients), BestOnValidation)
    # --fold all resumed onto a run whose saved split validates on patients: not silently a different run
    with pytest.raises(DataError, match="new --out"):
        make_selection(cfg.override(**{"data.fold": "all"}), patients)


def test_export_epoch_last_runs_the_whole_schedule_validates_for_the_record_and_exports_the_last(tmp_path):
    # patience 1 would stop a best-on-validation run at its first flat epoch; a fixed schedule ignores it
    cfg = tiny_config(tmp_path, "seg", **{"train.export_epoch": "last", "train.patience": 1, "train.epochs": 3})
    summary = loop.run(cfg)
    history = summary["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert all("val_volumetric_dice" in h for h in history)  # scored every epoch, for the record
    assert summary["exported_step"] == history[-1]["step"] and summary["metric"] is None
    meta = _metadata(summary)
    assert "best" not in meta and meta["exported"]["epoch"] == 3 and "fixed schedule" in meta["exported"]["chosen_by"]
    assert meta["metrics"]["volumetric_dice"] == history[-1]["val_volumetric_dice"]  # the last epoch's, not the best
    assert "chose nothing" in meta["metrics"]["protocol"] and meta["split"]["val"]


def test_the_export_epoch_flag_picks_the_selection(tmp_path):
    from flaxtumor.train.cli import build_parser, make_config

    cfg = make_config(build_parser().parse_args(["--export-epoch", "last"]))
    patients = load_dataset(tiny_config(tmp_path).data)[:1]
    assert cfg.train.export_epoch == "last"
    chosen = make_selection(cfg.override(**{"data.fold": 0}), patients)
    assert isinstance(chosen, LastEpoch) and chosen.patients == patients
    assert not chosen.judge({"volumetric_dice": 0.0}, best=0.9, bad_epochs=50).stop  # never stops early

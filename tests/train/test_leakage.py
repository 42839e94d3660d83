"""The leakage guard: the patients whose slices reach the training batches are exactly the split's training patients,
for the segmenter, the classifier and a cross-validation fold; a validation patient in the training data stops the run.

The expected patients are computed here from the data and the config, not read back from the run."""

import json
from pathlib import Path

import numpy as np
import pytest

from flaxtumor.data.lgg import Split, kfold_splits, load_dataset, make_split
from flaxtumor.data.pipeline import train_batches
from flaxtumor.train import loop
from tests.train.helpers import tiny_config


def _check(summary: dict, expected: Split) -> None:
    trained = summary["trained_patients"]
    assert trained == sorted(expected.train)
    assert not set(trained) & (set(expected.val) | set(expected.test))
    run = Path(summary["run_dir"])
    assert json.loads((run / "split.json").read_text())["train"] == list(expected.train)
    assert json.loads((Path(summary["checkpoint"]) / "metadata.json").read_text())["trained_patients"] == trained


@pytest.mark.parametrize("task", ["seg", "cls"])
def test_only_the_training_patients_are_trained_on(tmp_path, task):
    cfg = tiny_config(tmp_path, task, **{"train.epochs": 1})
    d = cfg.data
    expected = make_split(load_dataset(d), d.split_seed, d.test_fraction, d.val_fraction)
    assert expected.val and expected.test  # something that could leak
    _check(loop.run(cfg), expected)


def test_a_cross_validation_fold_trains_on_every_patient_but_its_own(tmp_path):
    cfg = tiny_config(tmp_path, "seg", **{"train.epochs": 1, "data.fold": 1, "data.folds": 3})
    patients = load_dataset(cfg.data)
    held_out = set(kfold_splits(patients, 3, cfg.data.split_seed)[1].test)
    rest = tuple(sorted(p.patient_id for p in patients if p.patient_id not in held_out))
    _check(loop.run(cfg), Split(rest, tuple(sorted(held_out)), (), cfg.data.split_seed))


def test_a_validation_patient_in_a_training_batch_stops_the_run(tmp_path):
    cfg = tiny_config(tmp_path, "seg")
    patients = load_dataset(cfg.data)
    split = make_split(patients, 0, 0.15, 0.15)
    slices = [s for p in patients if p.patient_id in split.train + split.val for s in p.slices]
    progress = loop.Progress()
    with pytest.raises(loop.TrainingLeak, match="in the validation split reached a training batch"):
        for batch in train_batches(slices, cfg.data, 8, seed=0, epoch=0):
            loop.record_patients(progress, split, slices, batch["index"])
    assert set(progress.trained_patients) <= set(split.train)


def test_batches_say_which_slices_they_hold(tmp_path):
    cfg = tiny_config(tmp_path, "seg")
    slices = [s for p in load_dataset(cfg.data)[:2] for s in p.slices]
    batches = list(train_batches(slices, cfg.data, 8, seed=0, epoch=0))
    index = np.concatenate([b["index"] for b in batches])
    assert sorted(index) == list(range(len(slices)))  # one shuffled epoch: every slice once
    labels = np.concatenate([b["label"] for b in batches])
    assert np.array_equal(labels, [slices[i].has_tumour for i in index])

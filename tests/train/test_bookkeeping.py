"""The end-of-epoch bookkeeping (`loop.end_of_epoch`) is pure: history, best score, early stopping, phase changes, as
the run's selection judges them (the best on validation, or, with --fold all, the last epoch)."""

import copy
import math

import pytest

from flaxtumor.config import TrainConfig
from flaxtumor.train.loop import Phase, Progress, end_of_epoch, plan_phases
from flaxtumor.train.selection import BestOnValidation, LastEpoch

PHASE = Phase(number=1, epochs=3, lr=1e-3)


def _end(progress, dice, **kw):
    args = dict(selection=BestOnValidation([], "seg", patience=2), phase=PHASE, phase_index=0, steps=4) | kw
    return end_of_epoch(progress, {"volumetric_dice": dice, "dice": 0.5}, **args)


def test_an_improving_epoch_is_recorded_and_the_input_is_left_alone():
    before = Progress(epoch=1, data_epoch=5, step_in_epoch=4, global_step=24, best=0.4, bad_epochs=1, loss_sum=2.0,
                      history=[{"epoch": 1}])
    snapshot = copy.deepcopy(before)
    done = _end(before, 0.6)
    assert before == snapshot  # pure
    assert done.improved and not done.stop and not done.phase_over and done.score == 0.6
    p = done.progress
    assert (p.epoch, p.data_epoch, p.step_in_epoch, p.global_step, p.loss_sum) == (2, 6, 0, 24, 0.0)
    assert (p.best, p.bad_epochs, p.phase_index) == (0.6, 0, 0)
    assert p.history[-1] == {"phase": 1, "epoch": 2, "global_epoch": 6, "step": 24, "train_loss": 0.5,
                             "val_volumetric_dice": 0.6, "val_dice": 0.5}
    assert len(p.history) == 2


def test_patience_stops_the_phase_and_the_next_phase_starts_fresh():
    first = _end(Progress(best=0.7, bad_epochs=0), 0.6)
    assert not first.improved and first.progress.bad_epochs == 1 and first.progress.best == 0.7
    second = _end(first.progress, 0.7)  # equal is not better
    assert second.stop and second.phase_over
    p = second.progress
    assert (p.phase_index, p.epoch, p.bad_epochs, p.best, p.data_epoch) == (1, 0, 0, -math.inf, 2)


def test_the_last_epoch_ends_the_phase_without_an_early_stop():
    done = _end(Progress(epoch=2, best=0.1), 0.9, phase_index=1)
    assert done.phase_over and not done.stop and done.improved
    assert (done.progress.phase_index, done.progress.epoch, done.progress.best) == (2, 0, -math.inf)
    assert done.progress.history[-1]["val_volumetric_dice"] == 0.9  # the phase's best is in history, not in `best`


def test_nan_metric_ranks_worst():
    done = end_of_epoch(Progress(), {"auc": float("nan")}, BestOnValidation([], "cls", 2), PHASE, 0, 4)
    assert done.score == -1.0 and done.improved  # better than nothing yet, worse than any real score
    assert not _end(Progress(best=0.0), float("nan")).improved


def test_without_validation_nothing_stops_early_and_the_phase_ends_at_its_last_epoch():
    progress = Progress(loss_sum=2.0)
    for epoch in range(1, PHASE.epochs + 1):
        done = end_of_epoch(progress, {}, LastEpoch(), PHASE, 0, 4)
        assert done.score is None and not done.improved and not done.stop  # however long it has gone "unimproved"
        assert done.phase_over == (epoch == PHASE.epochs)
        progress = done.progress
    assert [h["epoch"] for h in progress.history] == [1, 2, 3]
    assert not any(k.startswith("val_") for h in progress.history for k in h)  # no pretend validation metrics
    assert (progress.phase_index, progress.bad_epochs) == (1, 0)


@pytest.mark.parametrize(("task", "weights", "phase2", "expected"), [
    ("seg", "none", 10, [0]), ("cls", "none", 10, [0]), ("cls", "w", 10, [1, 2]), ("cls", "w", 0, [1]),
])
def test_phases(task, weights, phase2, expected):
    tcfg = TrainConfig(task=task, backbone_weights=weights, phase2_epochs=phase2, lr=1.0, phase2_lr_factor=0.1)
    phases = plan_phases(tcfg)
    assert [p.number for p in phases] == expected
    assert phases[-1].lr == (0.1 if expected[-1] == 2 else 1.0)


def test_the_epoch_wall_time_is_recorded_when_given():
    assert "seconds" not in _end(Progress(), 0.5).progress.history[-1]
    assert _end(Progress(), 0.5, seconds=123.456).progress.history[-1]["seconds"] == 123.5

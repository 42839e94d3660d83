"""Which epoch a run exports, and when a phase stops early: decided once, at set-up, from the run's split.

- `BestOnValidation` (the split holds validation patients): every epoch is scored on them; a phase stops early after
  `patience` epochs without a better score, the next phase starts from the best checkpoint so far, and the export is
  the best epoch.
- `LastEpoch`: nothing stops early, each phase continues from the previous phase's last epoch, and the export is the
  last epoch. Either `--fold all` (nnU-Net's "all" fold: every patient trains, so no epoch is scored; the number of
  epochs comes from cross-validation, crossval.json's `recommended_epochs`), or `--export-epoch last` (nnU-Net's fixed
  schedule: the validation patients are scored every epoch for the record, and no choice is made on them, so a
  cross-validation fold's held-out patients stay unseen by every choice).

Either way the chosen epoch is the training checkpoints' "best" step (`TrainCheckpoints` ranks epoch ends by
`metric`): the validation metric, or the epoch number, so the newest epoch end is kept and chosen even after later
mid-epoch saves. Restoring and exporting are then one code path for both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from flax import nnx
from jax.sharding import Mesh

from flaxtumor.config import ALL_FOLDS, Config
from flaxtumor.data.io import DataError
from flaxtumor.data.lgg import Patient
from flaxtumor.train.validation import SELECTION_METRIC, evaluate, format_metrics, selection_score


@dataclass(frozen=True)
class Judgement:
    """One finished epoch as the selection sees it."""

    score: float | None  # the selection metric (nan ranked as worst); None when nothing was scored
    best: float  # the phase's best score so far
    bad_epochs: int  # epochs in a row without a better score
    improved: bool
    stop: bool  # early stop


def _val(entry: dict[str, Any]) -> dict[str, Any]:
    """The validation metrics of a history entry, without their `val_` prefix."""
    return {k[4:]: v for k, v in entry.items() if k.startswith("val_")}


class BestOnValidation:
    """Scores every epoch on the validation patients; the best epoch is exported (see the module docstring)."""

    def __init__(self, patients: Sequence[Patient], task: str, patience: int):
        self.patients, self.task, self.patience = list(patients), task, patience
        self.metric = SELECTION_METRIC[task]

    def validate(self, model: nnx.Module, eval_step: Callable, cfg: Config, batch_size: int, mesh: Mesh
                 ) -> dict[str, float]:
        return evaluate(model, eval_step, self.patients, cfg, batch_size, mesh)

    def judge(self, val: dict[str, float], best: float, bad_epochs: int) -> Judgement:
        score = selection_score(val, self.task)
        improved = score > best
        bad = 0 if improved else bad_epochs + 1
        return Judgement(score, score if improved else best, bad, improved, bad >= self.patience)

    def checkpoint_metrics(self, entry: dict[str, Any], score: float | None) -> dict[str, float]:
        return {**_val(entry), self.metric: score}

    def epoch_line(self, entry: dict[str, Any], improved: bool) -> str:
        return f"val {format_metrics(_val(entry))}{' *' if improved else ''}"

    def record(self, entry: dict[str, Any], step: int, n_trained: int) -> dict[str, Any]:
        """The export metadata's `metrics` and `best`."""
        return {"metrics": _val(entry), "best": {"phase": entry["phase"], "epoch": entry["epoch"], "step": step}}

    def summary(self, entry: dict[str, Any], step: int) -> dict[str, Any]:
        return {"best_phase": entry["phase"], "best_epoch": entry["epoch"], "best_step": step, "metric": self.metric,
                "best_metric": entry[f"val_{self.metric}"]}

    def describe(self, entry: dict[str, Any], step: int, phase_label: str) -> str:
        value = entry[f"val_{self.metric}"]
        return f"best: {phase_label}epoch {entry['epoch']} (step {step}) {self.metric}={value:.4f}"


class LastEpoch:
    """Every epoch runs and the last is exported; validation patients, if given, are scored for the record only (see
    the module docstring)."""

    metric = "global_epoch"  # what TrainCheckpoints ranks epoch ends by: the newest wins

    def __init__(self, patients: Sequence[Patient] = ()):
        self.patients = list(patients)

    def validate(self, model: nnx.Module, eval_step: Callable, cfg: Config, batch_size: int, mesh: Mesh
                 ) -> dict[str, float]:
        return evaluate(model, eval_step, self.patients, cfg, batch_size, mesh) if self.patients else {}

    def judge(self, val: dict[str, float], best: float, bad_epochs: int) -> Judgement:
        return Judgement(None, best, 0, False, False)

    def checkpoint_metrics(self, entry: dict[str, Any], score: float | None) -> dict[str, float]:
        return {**_val(entry), self.metric: entry["global_epoch"]}

    def epoch_line(self, entry: dict[str, Any], improved: bool) -> str:
        if self.patients:
            return f"train_loss={entry['train_loss']:.4f} val {format_metrics(_val(entry))} (reported, not selected on)"
        return f"train_loss={entry['train_loss']:.4f} (not validated: no held-out patients)"

    def record(self, entry: dict[str, Any], step: int, n_trained: int) -> dict[str, Any]:
        """The export metadata's `metrics` (the last epoch's validation, or only a protocol that says why there is
        none) and `exported` (not `best`)."""
        if self.patients:
            metrics = {**_val(entry), "protocol": f"the last epoch on the {len(self.patients)} validation patients, "
                                                  "which chose nothing (fixed schedule, --export-epoch last)"}
            chosen_by = "the last epoch of a fixed schedule (--export-epoch last: validation reported, not selected on)"
        else:
            metrics = {"protocol": f"no held-out patients: trained on all {n_trained} patients, so there are no "
                                   "validation metrics; see crossval.json for the cross-validated estimate"}
            chosen_by = "the last epoch (--fold all: nothing held out to select on)"
        return {"metrics": metrics,
                "exported": {"phase": entry["phase"], "epoch": entry["epoch"], "step": step, "chosen_by": chosen_by}}

    def summary(self, entry: dict[str, Any], step: int) -> dict[str, Any]:
        return {"exported_phase": entry["phase"], "exported_epoch": entry["epoch"], "exported_step": step,
                "metric": None}

    def describe(self, entry: dict[str, Any], step: int, phase_label: str) -> str:
        how = "validation reported, not selected on" if self.patients else "exported without validation"
        return f"last epoch: {phase_label}epoch {entry['epoch']} (step {step}), {how}"


Selection = BestOnValidation | LastEpoch


def make_selection(cfg: Config, val_patients: Sequence[Patient]) -> Selection:
    """`LastEpoch` for `--fold all` (no validation patients) or `--export-epoch last` (validation reported); otherwise
    `BestOnValidation`, which needs validation patients."""
    if cfg.data.fold == ALL_FOLDS:
        if val_patients:  # a resumed run's saved split, made without --fold all
            where = cfg.train.out_dir or f"runs/{cfg.train.task}"
            raise DataError(where, f"--fold all, but this run's split holds {len(val_patients)} validation patients: "
                                   "start the all-patient run in a new --out")
        return LastEpoch()
    if cfg.train.export_epoch == "last":
        return LastEpoch(val_patients)
    if not val_patients:
        raise DataError(cfg.data.root, "the split has no validation patients to choose the best epoch on; to train on "
                                       "every patient without validation, use --fold all")
    return BestOnValidation(val_patients, cfg.train.task, cfg.train.patience)

"""`python -m flaxtumor.crossval`: k-fold cross-validation by patient, resumable, scored on out-of-fold predictions.

Fold k (0-based) is `train.py --fold k --folds K` run in OUT/fold_<k>/: the fold's patients (patient-level folds
stratified by tumour share) are its validation set and every other patient trains. Then every patient is predicted by
the one fold model that never trained on it, and the results go to
- OUT/oof/<patient_id>.npz: the probability volume (seg: (D, S, S) float16 at the model's input size S, and
  `flipped`, the same with flip TTA; cls: (D,)), the slice numbers, the fold and the crop box the model saw (top, left,
  height, width in input pixels; masks go back to the slices' size through it, as in the pipeline);
- OUT/crossval.json: per-patient scores and the headline metrics with bootstrap 95% intervals over patients; for seg
  the post-processing chosen on the out-of-fold predictions (`postprocessing`); and `recommended_epochs`, the median
  over folds of each fold's exported epoch, for the model trained on every patient (`train.py --fold all`), whose
  command is printed at the end; for seg, `levers`: what the chosen post-processing bought over the raw masks and
  what flip TTA would add to it, each paired by patient with a bootstrap interval (TTA is measured, not chosen);
- OUT/pipeline.json (seg): the chosen post-processing as the pipeline's operating point, in the format
  `flaxtumor.operating_point.read_operating_point` reads, with its provenance (`tuned_on`).

What ships is either the fold models as one ensemble (`python -m flaxtumor.ensemble`, nnU-Net's default: exactly the
models scored here) or one model trained on every patient for `recommended_epochs` (`train.py --fold all`). Several
such models averaged (seeds) are cross-validated by `flaxtumor.crossval_ensemble`, from one cross-validation per seed.

Note: by default each fold also picks its best epoch (and stops early) on its held-out patients, so out-of-fold
scores carry that small selection optimism. With `--export-epoch last` (nnU-Net's fixed schedule) each fold exports
its last epoch and its held-out patients choose nothing; `recommended_epochs` is then the schedule's length.

Resume (--resume): finished folds (exported checkpoint present) are skipped, an interrupted fold continues from its
latest checkpoint, and the out-of-fold step is redone. Single process: train folds multi-host with train.py --fold.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from flaxtumor import metrics as M
from flaxtumor.config import Config
from flaxtumor.data.io import read_image
from flaxtumor.data.lgg import Patient, load_split
from flaxtumor.data.preprocess import sequence_group
from flaxtumor.oof import OutOfFold, load_oof, oof_masks, predict_fold, save_oof
from flaxtumor.operating_point import OPERATING_POINT_FILE, choice_key, gate_and_postprocess, write_operating_point

CV_FILE = "crossval.json"
PREVIEW_FILE = "crossval_preview.json"  # --preview: the finished folds only
OOF_DIR = "oof"
ONE_MODEL = "the fold model that did not train on it"
# Mask thresholds cross-validation chooses among, besides the segmenter checkpoint's own. Averaging models (folds,
# seeds) softens the probabilities at a tumour's edge and the shortfall is mostly missed tumour, so one step lower.
MASK_THRESHOLDS = (0.5, 0.4)


def fold_dir(out: Path, fold: int) -> Path:
    return Path(out) / f"fold_{fold}"


def export_path(out: Path, fold: int, task: str) -> Path:
    from flaxtumor.train.loop import EXPORT_NAME

    return fold_dir(out, fold) / EXPORT_NAME[task]


def fold_config(base: Config, out: Path, fold: int) -> Config:
    """Fold `fold`'s run: its own folder; `resume` so an interrupted fold continues (crossval guards fresh starts)."""
    return base.override(
        **{"data.fold": fold, "train.out_dir": str(fold_dir(out, fold)), "train.resume": True, "train.export_dir": None}
    )


def train_folds(base: Config, out: Path, say: Callable[[str], None] = print) -> None:
    """Trains each fold in turn; a fold with an exported checkpoint is finished and skipped."""
    from flaxtumor.train import loop

    for fold in range(base.data.folds):
        if (export_path(out, fold, base.train.task) / "metadata.json").is_file():
            say(f"fold {fold}: finished, skipped")
            continue
        say(f"fold {fold} (0-based) of {base.data.folds}")
        loop.run(fold_config(base, out, fold))


def finished_folds(out: Path, folds: int, task: str) -> list[int]:
    """The folds whose model is exported."""
    return [k for k in range(folds) if (export_path(out, k, task) / "metadata.json").is_file()]


def held_out(out: Path, folds: int | Sequence[int], patients: Sequence[Patient]) -> dict[str, int]:
    """patient_id -> the fold that held it out, from each fold's recorded split; every patient exactly once (with a
    list of folds, a preview: the patients those folds hold out, each once)."""
    fold_of: dict[str, int] = {}
    preview = not isinstance(folds, int)
    for fold in (folds if preview else range(folds)):
        for pid in load_split(fold_dir(out, fold) / "split.json").val:
            if pid in fold_of:
                raise ValueError(f"patient {pid} is held out by folds {fold_of[pid]} and {fold}")
            fold_of[pid] = fold
    missing = sorted({p.patient_id for p in patients} - fold_of.keys())
    if missing and not preview:
        raise ValueError(f"{len(missing)} patient(s) held out by no fold: {missing[:5]}")
    return fold_of


def saved_fold(out: Path, fold: int, task: str, patient_ids: Sequence[str]) -> tuple[list[OutOfFold], Any]:
    """(the fold's saved out-of-fold volumes of `patient_ids`, its model's metadata), for --rescore. An error naming
    the file when one is missing, belongs to another fold, or is older than the fold model (retrained since)."""
    from flaxtumor.checkpoint_metadata import read_metadata

    checkpoint = export_path(out, fold, task)
    metadata = read_metadata(checkpoint)
    made = (checkpoint / "metadata.json").stat().st_mtime
    results = []
    for pid in patient_ids:
        path = Path(out) / OOF_DIR / f"{pid}.npz"
        if not path.is_file():
            raise ValueError(f"{path}: no saved out-of-fold prediction (run without --rescore to predict)")
        r = load_oof(path)
        if r.fold != fold or path.stat().st_mtime < made:
            why = f"predicted by fold {r.fold}, not {fold}" if r.fold != fold else f"older than {checkpoint}"
            raise ValueError(f"{path}: {why}; run without --rescore to predict again")
        results.append(r)
    return results, metadata


def score_seg(results: Sequence[OutOfFold], patients: dict[str, Patient], threshold: float, seed: int = 0,
              point: Any = None) -> dict:
    """Per-patient volumetric Dice and tumour-slice Dice, with percentile-bootstrap 95% intervals over patients; with
    `point` (an `OperatingPoint` whose classifier is off) at its mask threshold, after its area gate and
    post-processing; without, at `threshold`."""
    per_patient, slice_dice, loss_parts = {}, {}, {}
    for r in results:
        preds, truth = oof_masks(r, patients[r.patient_id], threshold if point is None else point.mask_threshold,
                                 tta=point is not None and point.tta)
        if point is not None:
            _, preds = gate_and_postprocess(np.zeros(len(preds)), preds, point)
        per_patient[r.patient_id] = M.dice(preds, truth)
        loss_parts[r.patient_id] = M.dice_loss_parts(preds, truth)
        slice_dice[r.patient_id] = [M.dice(p, t) for p, t in zip(preds, truth)]
    summary = M.summarise_patient_dice(per_patient)
    scored = [v for v in per_patient.values() if not np.isnan(v)]
    worst = min((pid for pid in per_patient if not np.isnan(per_patient[pid])), key=per_patient.get, default=None)
    pooled_slices = lambda groups: M.mean_over_scored([d for g in groups for d in g])  # noqa: E731
    return {
        "per_patient_dice": per_patient,
        "volumetric_dice": {
            "mean": summary["mean"],
            "mean_ci95": M.bootstrap_interval(scored, np.mean, seed=seed),
            "median": summary["median"],
            "median_ci95": M.bootstrap_interval(scored, np.median, seed=seed),
            "worst": summary["min"],
            "worst_patient": worst,
            "n_scored": summary["n_scored"],
            "empty_both_patients": summary["empty_both_patients"],
        },
        # where the mean's shortfall lies (metrics.dice_loss_parts): the parts sum to 1 - mean
        "dice_loss": {"mean": M.mean_dice_loss_parts(loss_parts), "per_patient": loss_parts},
        "tumour_slice_dice": {
            "value": pooled_slices(slice_dice.values()),
            "ci95": M.bootstrap_interval(list(slice_dice.values()), pooled_slices, seed=seed),
        },
    }


def postprocessing_candidates(mask_threshold: float = 0.5) -> list[Any]:
    """The operating points cross-validation chooses among, without the classifier (no out-of-fold classifier
    probabilities exist, and fewer knobs overfit less): at the checkpoint's `mask_threshold` and at `MASK_THRESHOLDS`,
    the segmenter alone or slice calls from its area alone (the fused gate's areas), each with every safe
    post-processing rule. The classifier is off (threshold inf: it flags no slice), so `gate_and_postprocess` gives the
    same masks and calls whatever a pipeline's classifier says."""
    from flaxtumor.operating_point import SAFE_POSTPROCESS_RULES, OperatingPoint
    from flaxtumor.tune import CLASSIFIER_OFF, MIN_AREAS

    mask_thresholds = (mask_threshold, *(t for t in MASK_THRESHOLDS if t != mask_threshold))
    return [OperatingPoint(threshold=CLASSIFIER_OFF, min_tumour_area=area, mask_threshold=t, postprocess=rule,
                           gate=area > 0)
            for t in mask_thresholds for area in MIN_AREAS for rule in SAFE_POSTPROCESS_RULES]


def choose_postprocessing(results: Sequence[OutOfFold], patients: dict[str, Patient], threshold: float) -> dict:
    """nnU-Net's way: every candidate scored on the out-of-fold predictions and chosen by the rule `tune` uses
    (`operating_point.choice_key`: Dice, then the slice calls' Youden's J, then the simpler point). With the classifier
    off a slice is called tumour exactly when its final mask is drawn. `threshold`: the segmenter checkpoint's mask
    threshold. Returns the candidates' scores and the choice."""
    rows, candidates = [], postprocessing_candidates(threshold)
    masks = {t: {r.patient_id: oof_masks(r, patients[r.patient_id], t) for r in results}
             for t in dict.fromkeys(c.mask_threshold for c in candidates)}
    for point in candidates:
        per_patient, calls, labels = {}, [], []
        for pid, (preds, truth) in masks[point.mask_threshold].items():
            _, final = gate_and_postprocess(np.zeros(len(preds)), preds, point)
            per_patient[pid] = M.dice(final, truth)
            calls.append(final.any(axis=(1, 2)))
            labels.append(truth.any(axis=(1, 2)))
        summary = M.summarise_patient_dice(per_patient)
        sensitivity, specificity = M.call_rates(np.concatenate(calls), np.concatenate(labels))
        rows.append({"mask_threshold": point.mask_threshold, "min_tumour_area": point.min_tumour_area,
                     "gate": point.gate, "postprocess": point.postprocess, "mean": summary["mean"],
                     "median": summary["median"], "worst": summary["min"], "sensitivity": sensitivity,
                     "specificity": specificity})

    def key(i: int) -> tuple:
        r = rows[i]
        return choice_key(r["mean"], r["sensitivity"], r["specificity"], False, r["postprocess"],
                          r["min_tumour_area"], r["mask_threshold"] != threshold)
    best = max(range(len(rows)), key=key)
    return {"candidates": rows, "chosen": rows[best], "point": candidates[best]}


def levers(results: Sequence[OutOfFold], patients: dict[str, Patient], threshold: float, point: Any, raw: dict,
           scored: dict) -> dict[str, Any]:
    """What the chosen post-processing bought over the raw masks, what a chosen mask threshold other than the
    checkpoint's bought over the same post-processing at the checkpoint's, and what flip TTA would add to the chosen
    point, each paired by patient on the same out-of-fold predictions (`compare_runs.paired`: the mean difference with
    a bootstrap 95% interval, better/worse counts). TTA is measured, not chosen: it doubles every model call."""
    from flaxtumor.compare_runs import paired

    out = {"postprocessing": {"versus": "raw masks", **paired(raw["per_patient_dice"], scored["per_patient_dice"])}}
    if point.mask_threshold != threshold:
        own = score_seg(results, patients, threshold, point=point.override(mask_threshold=threshold))
        out["mask_threshold"] = {"versus": f"the chosen post-processing at the checkpoint's mask threshold {threshold:g}",
                                 **paired(own["per_patient_dice"], scored["per_patient_dice"])}
    if all(r.flipped is not None for r in results):
        tta = score_seg(results, patients, threshold, point=point.override(tta=True))
        out["flip_tta"] = {"versus": "the chosen point without TTA", "volumetric_dice": tta["volumetric_dice"],
                           "tumour_slice_dice": tta["tumour_slice_dice"],
                           **paired(scored["per_patient_dice"], tta["per_patient_dice"])}
    return out


def epoch_note(export_epoch: str) -> str:
    """How the folds' exported epoch was chosen, for the notes on out-of-fold scores."""
    if export_epoch == "last":
        return "each fold exported the last epoch of a fixed schedule: its held-out patients chose nothing"
    return "each fold also chose its best epoch on its held-out patients"


def write_pipeline(out: Path, choice: dict, scores: dict, folds: int, export_epoch: str = "best",
                   predicted_by: str = ONE_MODEL) -> Path:
    """OUT/pipeline.json: the chosen candidate as the pipeline's operating point, with how it was chosen."""
    patients = sorted(scores["per_patient_dice"])
    v = scores["volumetric_dice"]
    tuned_on = {
        "patients": patients,
        "split": f"out-of-fold predictions of {folds}-fold cross-validation over {len(patients)} patients: each "
                 f"patient predicted once, by {predicted_by} ({CV_FILE})",
        "criterion": "mean per-patient volumetric Dice (empty-vs-empty patients excluded); ties (equal to 4 decimals) "
                     "to the higher Youden's J of the slice calls (a slice is called when its mask is drawn), then to "
                     "the simpler point: no post-processing, then no area gate, then the segmenter checkpoint's own "
                     "mask threshold",
        "candidates": [{k: c[k] for k in ("mask_threshold", "min_tumour_area", "gate", "postprocess")}
                       for c in choice["candidates"]],
        "classifier": "not searched: no out-of-fold classifier probabilities exist, so the classifier is off "
                      "(threshold null: it flags no slice); slices are called by the segmenter's area alone (gate on) "
                      "or every mask is kept (gate off: the segmenter alone)",
        "scores": {"volumetric_dice": v, "tumour_slice_dice": scores["tumour_slice_dice"]},
        "note": "chosen and scored on the same out-of-fold predictions: slightly optimistic (as nnU-Net's choice of "
                f"post-processing); {epoch_note(export_epoch)}",
    }
    validation = {"per_patient_dice_mean": v["mean"], "per_patient_dice_median": v["median"],
                  "per_patient_dice_min": v["worst"], "tumour_slice_dice": scores["tumour_slice_dice"]["value"]}
    return write_operating_point(Path(out) / OPERATING_POINT_FILE, choice["point"], tuned_on=tuned_on,
                                 validation=validation)


def recommended_epochs(out: Path, folds: int | Sequence[int], task: str) -> dict[str, Any]:
    """The epochs for the model trained on every patient: the median over folds of each fold's exported epoch, rounded
    half up. That is its export's `best` (chosen on its held-out patients), or `exported` with --export-epoch last
    (the last epoch of the fixed schedule, so the median is the schedule's length). None for multi-phase runs (cls
    from pretrained weights), whose exported epoch does not map onto one --epochs."""
    per_fold, last = [], []
    for fold in (range(folds) if isinstance(folds, int) else folds):
        meta = json.loads((export_path(out, fold, task) / "metadata.json").read_text())
        chosen = meta.get("best") or meta["exported"]
        last.append("best" not in meta)
        per_fold.append({"fold": fold, "phase": chosen["phase"], "best_epoch": chosen["epoch"],
                         "epochs_trained": len(meta.get("history") or [])})
    epochs = [f["best_epoch"] for f in per_fold]
    single_phase = all(f["phase"] == 0 for f in per_fold)
    how = ("each fold's last epoch (a fixed schedule: nothing chosen on its held-out patients)" if all(last)
           else "each fold's best epoch (chosen on its held-out patients)")
    return {
        "epochs": int(math.floor(float(np.median(epochs)) + 0.5)) if single_phase else None,
        "rule": f"median over folds of {how}, rounded half up"
                + ("" if single_phase else "; not given for multi-phase runs: set each phase's epochs from per_fold"),
        "per_fold": per_fold,
        "note": "--epochs also sets the length of the learning-rate schedule, so the all-patient run anneals over "
                "these epochs, not the folds' own; an epoch is the same number of steps only with a fixed "
                "--samples-per-epoch (tumour sampling), otherwise it grows with the number of training patients",
    }


def all_fold_command(out: Path, epochs: int) -> str:
    """The train.py command for the model trained on every patient with this cross-validation's own recipe."""
    out = Path(out)
    return shlex.join(["python", "train.py", "--config", str(out / "config.json"), "--fold", "all",
                       "--epochs", str(epochs), "--out", str(out / "fold_all")])


def score_cls(results: Sequence[OutOfFold], patients: dict[str, Patient], threshold: float, seed: int = 0) -> dict:
    """Slice-level AUC and accuracy over all out-of-fold slices, with bootstrap 95% intervals over patients."""
    groups = [
        (r.probabilities, np.array([s.has_tumour for s in patients[r.patient_id].slices], bool)) for r in results
    ]

    def pooled(metric: Callable[[np.ndarray, np.ndarray], float]) -> Callable[[list], float]:
        return lambda gs: metric(np.concatenate([g[0] for g in gs]), np.concatenate([g[1] for g in gs]))

    auc = pooled(lambda p, y: M.auc(p, y) if 0 < y.sum() < len(y) else float("nan"))
    accuracy = pooled(lambda p, y: float(((p >= threshold) == y).mean()))
    return {
        "auc": auc(groups), "auc_ci95": M.bootstrap_interval(groups, auc, seed=seed),
        "accuracy": accuracy(groups), "accuracy_ci95": M.bootstrap_interval(groups, accuracy, seed=seed),
    }


def out_of_fold(base: Config, out: Path, say: Callable[[str], None] = print, preview: bool = False,
                rescore: bool = False) -> dict[str, Any]:
    """Predicts every patient with the fold that held it out, writes OUT/oof/*.npz and OUT/crossval.json (and the
    chosen post-processing as OUT/pipeline.json). `preview`: the finished folds only, while the others train: their
    held-out patients scored the same way, written to OUT/crossval_preview.json and nothing else. `rescore`: the
    saved OUT/oof/*.npz scored again (after the candidates changed), predicting nothing."""
    from flaxtumor.data.lgg import load_dataset

    patients = {p.patient_id: p for p in load_dataset(base.data)}
    folds = finished_folds(out, base.data.folds, base.train.task) if preview else list(range(base.data.folds))
    if not folds:
        raise ValueError(f"{out}: no fold has finished yet, so there is nothing to preview")
    fold_of = held_out(out, folds if preview else base.data.folds, list(patients.values()))
    folder = Path(out) / OOF_DIR
    results, threshold = [], None
    for fold in folds:
        mine = [patients[pid] for pid in sorted(fold_of) if fold_of[pid] == fold]
        if rescore:
            fold_results, metadata = saved_fold(out, fold, base.train.task, [p.patient_id for p in mine])
        else:
            fold_results, metadata = predict_fold(fold, export_path(out, fold, base.train.task), mine,
                                                  tta=base.train.task == "seg")
        threshold = metadata.threshold
        if not preview and not rescore:  # a preview writes nothing final
            folder.mkdir(parents=True, exist_ok=True)
            for r in fold_results:
                save_oof(r, folder)
        results += fold_results
        say(f"fold {fold}: {len(mine)} held-out patients {'read back' if rescore else 'predicted'}")
    return write_report(base, out, results, patients, fold_of, threshold, folds, preview)


def write_report(base: Config, out: Path, results: Sequence[OutOfFold], patients: dict[str, Patient],
                 fold_of: dict[str, int], threshold: float, folds: Sequence[int], preview: bool = False,
                 epochs_from: Path | None = None, extra: dict[str, Any] | None = None,
                 predicted_by: str = ONE_MODEL) -> dict[str, Any]:
    """Scores out-of-fold `results` and writes OUT/crossval.json (OUT/crossval_preview.json with `preview`) and, for a
    final seg report, OUT/pipeline.json with the post-processing chosen on them. `epochs_from`: the cross-validation
    whose fold exports give `recommended_epochs` (default OUT); `extra`: keys added to the report; `predicted_by`:
    what predicted each patient, for the protocol notes."""
    score = score_seg if base.train.task == "seg" else score_cls
    raw_scores, chosen = score(results, patients, threshold), {}
    if base.train.task == "seg":
        choice = choose_postprocessing(results, patients, threshold)
        scored = score_seg(results, patients, threshold, point=choice["point"])
        chosen = {"postprocessing": {
            "protocol": "chosen on these out-of-fold predictions among the candidates below (best mean per-patient "
            f"Dice); scored on the same predictions, so slightly optimistic (as nnU-Net's); as an operating point in "
            f"{OPERATING_POINT_FILE}",
            "chosen": choice["chosen"], "candidates": choice["candidates"], **scored,
        }, "levers": levers(results, patients, threshold, choice["point"], raw_scores, scored),
            "by_sequences": by_sequences(patients, scored["per_patient_dice"])}
        if not preview:
            write_pipeline(out, choice, scored, base.data.folds, base.train.export_epoch, predicted_by)
    report = {
        "task": base.train.task,
        "folds": base.data.folds,
        **({"preview": f"{len(folds)} of {base.data.folds} folds finished ({folds}): their {len(results)} held-out "
                       "patients only; not the cross-validation result"} if preview else {}),
        "split_seed": base.data.split_seed,
        "n_patients": len(results),
        "threshold": threshold,
        "fold_of": {pid: fold_of[pid] for pid in sorted(fold_of)},
        "protocol": f"each patient predicted once, by {predicted_by}; intervals: percentile "
        "bootstrap over patients (2000 resamples); empty-vs-empty patients and slices are not scored",
        **raw_scores,
        **chosen,
        **(extra or {}),
        "recommended_epochs": recommended_epochs(epochs_from or out, folds, base.train.task),
    }
    (Path(out) / (PREVIEW_FILE if preview else CV_FILE)).write_text(json.dumps(report, indent=2, default=_jsonable)
                                                                   + "\n")
    return report


def by_sequences(patients: dict[str, Patient], per_patient_dice: dict[str, float]) -> dict[str, Any]:
    """Per-patient Dice by which MRI sequences each patient really has (`preprocess.sequence_group`): kaggle_3m fills
    a missing contrast with FLAIR, and such patients are a known weak spot."""
    group_of = {pid: sequence_group(np.stack([read_image(s.image_path) for s in patients[pid].slices]))
                for pid in per_patient_dice}
    return {"rule": "a contrast stored as an exact copy of FLAIR on every pixel is missing",
            **M.dice_by_group(per_patient_dice, group_of)}


def _jsonable(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def headline(report: dict[str, Any]) -> str:
    if report["task"] == "seg":
        v, s = report["volumetric_dice"], report["tumour_slice_dice"]
        lo, hi = v["mean_ci95"]
        line = (f"raw masks: per-patient Dice mean {v['mean']:.4f} [{lo:.4f}, {hi:.4f}], median {v['median']:.4f}, "
                f"worst {v['worst']:.4f} ({v['worst_patient']}); tumour-slice Dice {s['value']:.4f}")
        if "postprocessing" in report:
            pp = report["postprocessing"]
            c, v = pp["chosen"], pp["volumetric_dice"]
            lo, hi = v["mean_ci95"]
            line += (f"\nchosen post-processing ({c['postprocess']}, area gate {c['min_tumour_area']:g}, mask "
                     f"threshold {c['mask_threshold']:g}): per-patient "
                     f"Dice mean {v['mean']:.4f} [{lo:.4f}, {hi:.4f}], median {v['median']:.4f}, worst "
                     f"{v['worst']:.4f}; tumour-slice Dice {pp['tumour_slice_dice']['value']:.4f}\n  "
                     f"{M.describe_dice_loss(pp['dice_loss']['mean'])} (means over patients)")
        if tta := report.get("levers", {}).get("flip_tta"):
            lo, hi = tta["mean_difference_ci95"]
            line += (f"\nflip TTA on the chosen point: per-patient Dice {tta['mean_difference']:+.4f} [{lo:+.4f}, "
                     f"{hi:+.4f}] ({tta['better']} better, {tta['worse']} worse); measured, not chosen")
        return line
    lo, hi = report["auc_ci95"]
    return f"AUC {report['auc']:.4f} [{lo:.4f}, {hi:.4f}], accuracy {report['accuracy']:.4f}"


def _next_step(report: dict[str, Any], out: Path) -> str:
    epochs = report["recommended_epochs"]["epochs"]
    ship = ""
    if report["task"] == "seg":
        ship = (f"next, the model to ship: the fold models themselves as one ensemble (the models scored above), "
                f"operating point {out / OPERATING_POINT_FILE}\n"
                f"  {shlex.join(['python', '-m', 'flaxtumor.ensemble', '--cv', str(out), '--out', 'SEGMENTER_DIR'])}"
                "\nor ")
    if epochs is None:
        return ship + (f"no single --epochs for an all-patient model (multi-phase runs): see recommended_epochs in "
                       f"{CV_FILE}")
    return (ship + f"one model on every patient, this recipe, the folds' median exported epoch ({epochs})\n"
            f"  {all_fold_command(out, epochs)}")


def main(argv: Sequence[str] | None = None) -> int:
    from flaxtumor.train import cli

    parser = cli.build_parser()
    parser.prog = "python -m flaxtumor.crossval"
    parser.description = ("Cross-validation by patient: trains every fold (as train.py --fold K), then scores "
                          "out-of-fold predictions. Takes train.py's flags; --out is the cross-validation folder.")
    parser.add_argument("--preview", action="store_true",
                        help="while folds still train (in another process): score the finished folds' held-out "
                             f"patients only, as the final step will, into OUT/{PREVIEW_FILE}; trains nothing")
    parser.add_argument("--rescore", action="store_true",
                        help=f"a finished cross-validation's saved predictions (OUT/{OOF_DIR}) scored again, e.g. after "
                             "the post-processing candidates changed: trains and predicts nothing, rewrites "
                             f"OUT/{CV_FILE} and OUT/{OPERATING_POINT_FILE}")
    args = parser.parse_args(argv)
    if args.preview and args.rescore:
        parser.error("--preview and --rescore: choose one")
    if args.preview or args.rescore:
        flag = "--preview" if args.preview else "--rescore"
        if not (Path(args.out or "runs/cv") / "config.json").is_file():
            parser.error(f"{flag}: {args.out or 'runs/cv'} holds no cross-validation (no config.json)")
        args.resume = True  # the cross-validation's own config
    if args.fold is not None:
        parser.error("--fold: crossval runs every fold (train a single fold with train.py --fold K)")
    if not args.resume and not args.config and (args.task is None or args.data is None):
        parser.error("--task and --data are required (unless --config or --resume supplies them)")
    args.out = args.out or "runs/cv"
    out = Path(args.out)
    if not args.resume and ((out / "config.json").exists() or any(out.glob("fold_*"))):
        print(f"error: {out} already holds a cross-validation; pass --resume to continue it or choose another --out",
              file=sys.stderr)
        return 2
    return _run(args, out)


def _run(args: Any, out: Path) -> int:
    from flaxtumor.data.io import DataError
    from flaxtumor.models import WeightsError
    from flaxtumor.train import cli, loop
    from flaxtumor.checkpoints import CheckpointError
    from flaxtumor.runtime import enable_compilation_cache

    try:
        base = cli.make_config(args).override(**{"train.out_dir": str(out), "data.fold": None, "train.resume": False})
    except (ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    enable_compilation_cache()  # folds and resumes reuse the compiled train and eval steps
    try:
        if args.preview:
            report = out_of_fold(base, out, preview=True)
            print(f"PREVIEW, {report['preview']}\n{headline(report)}; details: {out / PREVIEW_FILE}")
            return 0
        if not args.rescore:
            out.mkdir(parents=True, exist_ok=True)
            base.to_json(out / "config.json")  # what --resume reads back
            train_folds(base, out)
        report = out_of_fold(base, out, rescore=args.rescore)
        print(headline(report) + f"; details: {out / CV_FILE}")
        print(_next_step(report, out))
    except (DataError, WeightsError, CheckpointError, loop.RunExists, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except loop.NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m flaxtumor.compare_runs RUN RUN [RUN ...]`: segmenters trained with different recipes, scored on the same
held-out patients and compared patient by patient.

A recipe lever (deep supervision, 2.5D input, a loss, a resolution) is screened by training one fold with it and one
without. Their validation curves alone hide how noisy 16 patients are; the paired comparison does not: each run
predicts the held-out patients of its split (which must be the same patients for every run, and trained on by none),
is scored as cross-validation scores (`crossval.score_seg`: per-patient volumetric Dice of the raw masks, no gate, no
post-processing), and every later run is compared with the first on the same patients: the mean per-patient
difference with a percentile-bootstrap 95% interval over patients, and how many patients got better or worse.

With `--ensemble` the runs' averaged probabilities are scored too, as one more run: what an ensemble of these
recipes would buy on patients none of them trained on. With `--flair-only` every held-out patient is scored as if it
lacked both contrasts (pre- and post-contrast replaced by its FLAIR, as kaggle_3m stores such a patient): how the runs
read the FLAIR-only patients of the dataset, with 16 patients instead of the 5 it has. With `--versus-crossval
CV.json` the baseline is a finished cross-validation's recorded out-of-fold Dice of the same patients (its
`per_patient_dice`, scored the same way), for when that cross-validation's fold models are gone or a new recipe's fold
is set against the shipped cross-validation.

A run is a training folder holding an exported `segmenter/` (as `train.py --out` writes it), or the export itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from flaxtumor import metrics as M

TIE = 1e-4  # a per-patient difference smaller than this counts as neither better nor worse


def held_out_patients(metas: dict[str, Any]) -> list[str]:
    """The validation patients every run shares; an error naming the runs when they differ or one trained on them."""
    first, *rest = metas.items()
    patients = sorted((first[1].split or {}).get("val") or [])
    if not patients:
        raise ValueError(f"{first[0]}: its split has no validation patients to compare on")
    for name, meta in metas.items():
        if sorted((meta.split or {}).get("val") or []) != patients:
            raise ValueError(f"{name} and {first[0]} hold out different patients: compare runs of the same fold")
        if seen := sorted(set(meta.get("trained_patients") or []) & set(patients)):
            raise ValueError(f"{name} trained on {len(seen)} of the held-out patients (e.g. {seen[0]})")
    return patients


def paired(base: dict[str, float], other: dict[str, float], seed: int = 0) -> dict[str, Any]:
    """`other` minus `base` over the patients both score (empty-vs-empty patients are nan and left out)."""
    ids = [pid for pid in base if not np.isnan(base[pid]) and not np.isnan(other.get(pid, np.nan))]
    diffs = [other[pid] - base[pid] for pid in ids]
    return {
        "mean_difference": float(np.mean(diffs)) if diffs else float("nan"),
        "mean_difference_ci95": M.bootstrap_interval(diffs, np.mean, seed=seed),
        "better": sum(d > TIE for d in diffs), "worse": sum(d < -TIE for d in diffs),
        "same": sum(abs(d) <= TIE for d in diffs), "n_patients": len(diffs),
    }


def recorded_row(cv_file: Path, patient_ids: Sequence[str], threshold: float) -> dict[str, Any]:
    """The baseline row from a finished cross-validation (`crossval.json`): the out-of-fold Dice its fold models gave
    these patients. They must be exactly the patients one of its folds held out, scored at the same mask threshold."""
    cv = json.loads(Path(cv_file).read_text())
    if cv.get("task") != "seg" or "per_patient_dice" not in cv:
        raise ValueError(f"{cv_file}: not a segmenter cross-validation's crossval.json")
    folds = {cv["fold_of"].get(pid) for pid in patient_ids}
    if None in folds or len(folds) != 1:
        raise ValueError(f"{cv_file}: the runs' held-out patients are not one fold of that cross-validation "
                         f"(its folds {sorted(map(str, folds))}); compare runs made with its folds and split seed")
    fold = folds.pop()
    if sorted(pid for pid, k in cv["fold_of"].items() if k == fold) != sorted(patient_ids):
        raise ValueError(f"{cv_file}: its fold {fold} holds out other patients than the runs do")
    if cv["threshold"] != threshold:
        raise ValueError(f"{cv_file}: scored at mask threshold {cv['threshold']}, the runs at {threshold}")
    dice = {pid: float("nan") if cv["per_patient_dice"][pid] is None else cv["per_patient_dice"][pid]
            for pid in patient_ids}
    scored = [v for v in dice.values() if not np.isnan(v)]
    per_fold = {f["fold"]: f for f in (cv.get("recommended_epochs") or {}).get("per_fold", [])}
    epoch = f"{per_fold[fold]['best_epoch']}/{per_fold[fold]['epochs_trained']}" if fold in per_fold else "?"
    return {"run": f"{cv_file} (fold {fold}, recorded)", "epoch": epoch, "preprocessing": None,
            "mean": float(np.mean(scored)), "mean_ci95": M.bootstrap_interval(scored, np.mean),
            "median": float(np.median(scored)), "worst": float(np.min(scored)), "tumour_slice_dice": None,
            "dice_loss": None, "per_patient_dice": dice}


def _epoch(meta: Any) -> str:
    chosen = meta.get("best") or meta.get("exported") or {}
    return f"{chosen.get('epoch', '?')}/{len(meta.get('history') or [])}"


def _row(run: str, epoch: str, preprocessing: dict[str, Any], scores: dict[str, Any]) -> dict[str, Any]:
    return {"run": run, "epoch": epoch, "preprocessing": preprocessing,
            **{k: scores["volumetric_dice"][k] for k in ("mean", "mean_ci95", "median", "worst")},
            "tumour_slice_dice": scores["tumour_slice_dice"]["value"],
            "dice_loss": scores["dice_loss"]["mean"], "per_patient_dice": scores["per_patient_dice"]}


def averaged(predictions: Sequence[Sequence[Any]], rows: Sequence[dict[str, Any]]) -> list[Any]:
    """Each patient's probabilities averaged over the runs (`oof.OutOfFold` lists in the same patient order), as
    a fold ensemble averages its members (`flaxtumor.ensemble`). The runs must share their output geometry: the image
    size and the crop (2.5D input or deep supervision may differ, as they change only what a model sees)."""
    geometry = {(r["preprocessing"]["image_size"], r["preprocessing"].get("crop", "none")) for r in rows}
    if len(geometry) > 1:
        raise ValueError(f"--ensemble: the runs' outputs differ in (image size, crop): {sorted(geometry)}; an "
                         "ensemble averages probabilities pixel by pixel, so its members must share them")
    from flaxtumor.crossval_ensemble import average_oof

    return average_oof(predictions)


def compare(runs: Sequence[Path], data: str | None = None, ensemble: bool = False,
            flair_only: bool = False, versus_crossval: Path | None = None) -> dict[str, Any]:
    """Scores every run on the shared held-out patients; the first run is the baseline. With `ensemble`, also the
    runs' averaged probabilities (`averaged`), as one more row; with `flair_only`, on FLAIR-only copies of the
    patients (`oof.predict_fold`); with `versus_crossval`, the baseline is that cross-validation's recorded
    out-of-fold Dice of these patients (`recorded_row`), before the runs."""
    if flair_only and versus_crossval:
        raise ValueError("--flair-only with --versus-crossval: the recorded Dice is of the patients as stored")
    from flaxtumor.checkpoint_metadata import read_metadata, segmenter_export
    from flaxtumor.crossval import score_seg
    from flaxtumor.oof import predict_fold
    from flaxtumor.data.lgg import load_dataset, select

    metas = {str(run): read_metadata(segmenter_export(run)) for run in runs}
    patient_ids = held_out_patients(metas)
    first = next(iter(metas.values()))
    # checked before any prediction, so a mismatched cross-validation fails at once
    recorded = recorded_row(versus_crossval, patient_ids, first.threshold) if versus_crossval else None
    config = dataclasses.replace(first.config.data, root=str(data or first.config.data.root), split_file=None)
    patients = {p.patient_id: p for p in select(load_dataset(config), patient_ids)}
    rows, predictions = [], []
    for run in runs:
        results, meta = predict_fold(0, segmenter_export(run), list(patients.values()), flair_only=flair_only)
        predictions.append(results)
        rows.append(_row(str(run), _epoch(meta), meta.preprocessing.to_dict(),
                         score_seg(results, patients, meta.threshold)))
    if ensemble:
        rows.append(_row(f"ensemble of the {len(runs)} runs", "-", rows[0]["preprocessing"],
                         score_seg(averaged(predictions, rows), patients, first.threshold)))
    if recorded:
        rows.insert(0, recorded)
    for row in rows[1:]:
        row["versus_first"] = paired(rows[0]["per_patient_dice"], row["per_patient_dice"])
    inputs = ("every patient as FLAIR only (pre- and post-contrast replaced by FLAIR)" if flair_only
              else "the patients as stored")
    return {"patients": patient_ids, "input": inputs, "protocol": "per-patient volumetric Dice of the raw masks (no "
            "gate, no post-processing) on the held-out patients every run shares; differences paired by patient, "
            "later run minus the first, with a percentile-bootstrap 95% interval over patients (2000 resamples)",
            "runs": rows}


def table(report: dict[str, Any]) -> str:
    lines = [f"{len(report['patients'])} held-out patients, {report['input']}; {report['protocol']}",
             f"{'run':<40} {'epoch':>6} {'mean':>7} {'median':>7} {'worst':>7}  vs first: Δmean [95% CI], better/worse"]
    for r in report["runs"]:
        line = f"{r['run'][-40:]:<40} {r['epoch']:>6} {r['mean']:7.4f} {r['median']:7.4f} {r['worst']:7.4f}"
        if v := r.get("versus_first"):
            lo, hi = v["mean_difference_ci95"]
            line += f"  {v['mean_difference']:+.4f} [{lo:+.4f}, {hi:+.4f}], {v['better']}/{v['worse']}"
        lines.append(line)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flaxtumor.compare_runs", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="training folders (or segmenter exports); the first is the "
                                                       "baseline")
    ap.add_argument("--data", default=None, help="kaggle_3m folder (default: the first run's data root)")
    ap.add_argument("--out", type=Path, default=None, help="also write the report (JSON) here")
    ap.add_argument("--ensemble", action="store_true",
                    help="also score the runs as one ensemble (their probabilities averaged, as a fold ensemble "
                    "does), compared with the first run like the others; the runs must share image size and crop")
    ap.add_argument("--flair-only", action="store_true",
                    help="score every patient as if it lacked both contrasts (pre- and post-contrast replaced by its "
                    "FLAIR, as kaggle_3m stores such a patient)")
    ap.add_argument("--versus-crossval", type=Path, default=None, metavar="CV.json",
                    help="the baseline is this finished cross-validation's recorded out-of-fold Dice of the runs' "
                    "held-out patients (e.g. checkpoints/crossval.json), not a run: then one run is enough")
    args = ap.parse_args(argv)
    if len(args.runs) < (1 if args.versus_crossval else 2):
        ap.error("give at least two runs: the baseline first (or one run and --versus-crossval)")
    try:
        report = compare(args.runs, args.data, args.ensemble, args.flair_only, args.versus_crossval)
    except (ValueError, OSError) as e:  # DataError and CheckpointError are ValueErrors with one clear line
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(report))
    if args.out:
        from flaxtumor.operating_point import jsonable

        args.out.write_text(json.dumps(jsonable(report), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

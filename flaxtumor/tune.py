"""`python -m flaxtumor.tune --data PATH [--checkpoints DIR]`: choose the pipeline's operating point on the
validation patients recorded in the checkpoints (or on `--patients`), and write it to DIR/pipeline.json.

What is chosen: the classifier threshold, the fused gate's minimum segmented area (0 = classifier alone), the
post-processing rule (among `SAFE_POSTPROCESS_RULES`: never the largest component, which can erase a real tumour),
and flip test-time augmentation. The criterion is the headline metric, mean per-patient volumetric Dice of the whole
pipeline; points whose Dice ties (equal to 4 decimals) are told apart by the slice calls' Youden's J (sensitivity +
specificity - 1), then by simplicity (no TTA, then no post-processing, then no fused gate). Only validation patients
are ever read: never test patients, never a patient either model trained on, and never the patients that will judge
the shipped models. The file also records an ablation (what each choice bought on validation), so the model card can
report it. Numbers chosen and reported on the same patients are optimistic; the model card says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from flaxtumor import metrics
from flaxtumor.data.lgg import Patient, load_dataset, select
from flaxtumor.evaluate import load_volume, missing_checkpoints
from flaxtumor.inference import Pipeline
from flaxtumor.operating_point import (
    OPERATING_POINT_FILE, SAFE_POSTPROCESS_RULES, OperatingPoint, choice_key, flag_at_classifier_threshold,
    gate_and_postprocess, write_operating_point,
)

# Ties in Dice used to go to sensitivity, which pushed the shipped threshold to this grid's lower edge (0.05, slice-call
# specificity 0.74; the model card says so); Youden's J weighs both kinds of slice-call error instead.
# Threshold 0 (no classifier gate) is the "segmenter alone" ablation row.
THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.05, 1.0, 0.05))
CLASSIFIER_OFF = float("inf")  # a threshold no probability reaches: slice calls come from the segmenter's area alone
MIN_AREAS = (0.0, 0.0005, 0.001, 0.002, 0.004, 0.008)  # fraction of the slice; 0.001 ≈ 65 px at 256²


def _raw_outputs(pipeline: Pipeline, volumes: Sequence[tuple[list[np.ndarray], np.ndarray]], tta: bool
                 ) -> list[tuple[np.ndarray, ...]]:
    """Per patient: (classifier probabilities, ungated segmenter masks, truth), computed once per TTA setting. Only
    the mask threshold (the pipeline's) and TTA shape these outputs; every other setting is searched over them."""
    point = OperatingPoint(mask_threshold=pipeline.point.mask_threshold, tta=tta)
    out = []
    for images, truth in tqdm(volumes, unit="patient", desc=f"tta={tta}"):
        probs = pipeline.tumour_probabilities(images, volume=True, point=point)
        masks = np.stack(pipeline.segment(images, volume=True, point=point))
        out.append((probs, masks, truth))
    return out


def score(raw: list[tuple[np.ndarray, ...]], point: OperatingPoint) -> dict[str, float]:
    """Pipeline metrics for one operating point over the patients' raw outputs (made at the point's TTA and mask
    threshold)."""
    per_patient, calls_all, labels_all = {}, [], []
    for i, (probs, masks, truth) in enumerate(raw):
        calls, final = gate_and_postprocess(probs, masks, point)
        per_patient.update(metrics.volumetric_dice_per_patient({str(i): final}, {str(i): truth}))
        calls_all.append(calls)
        labels_all.append(truth.any(axis=(1, 2)))
    summary = metrics.summarise_patient_dice(per_patient)
    calls, labels = np.concatenate(calls_all), np.concatenate(labels_all)
    sensitivity, specificity = metrics.call_rates(calls, labels)
    return {
        "per_patient_dice_mean": summary["mean"],
        "per_patient_dice_median": summary["median"],
        "per_patient_dice_min": summary["min"],
        "detection_accuracy": float((calls == labels).mean()),
        "detection_sensitivity": sensitivity,
        "detection_specificity": specificity,
    }


def raw_outputs(pipeline: Pipeline, patients: Sequence[Patient]) -> dict[bool, list[tuple[np.ndarray, ...]]]:
    """{tta: per-patient raw outputs}: every model call tuning needs, made once."""
    volumes = [load_volume(p) for p in patients]  # read once, scored with and without TTA
    return {tta: _raw_outputs(pipeline, volumes, tta) for tta in (False, True)}


VAL_PATIENTS = "val patients recorded in the segmenter checkpoint"


def tune(pipeline: Pipeline, patients: Sequence[Patient], thresholds: Sequence[float] = THRESHOLDS,
         source: str = VAL_PATIENTS) -> dict[str, Any]:
    return choose(raw_outputs(pipeline, patients), pipeline.point.mask_threshold, [p.patient_id for p in patients],
                  thresholds, source)


def choose(raws: dict[bool, list[tuple[np.ndarray, ...]]], mask_threshold: float, patient_ids: Sequence[str],
           thresholds: Sequence[float] = THRESHOLDS, source: str = VAL_PATIENTS) -> dict[str, Any]:
    """The operating point (best per-patient Dice over the grid), its validation scores and the ablation."""
    def point_of(p: dict[str, Any], gate: bool = True) -> OperatingPoint:
        return OperatingPoint(threshold=p["threshold"], min_tumour_area=p["min_tumour_area"],
                              mask_threshold=mask_threshold, tta=p["tta"], gate=gate, postprocess=p["postprocess"])

    grid = []
    for tta, threshold, area, rule in itertools.product((False, True), thresholds, MIN_AREAS, SAFE_POSTPROCESS_RULES):
        p = {"tta": tta, "threshold": threshold, "min_tumour_area": area, "postprocess": rule}
        grid.append((p, score(raws[tta], point_of(p))))
    def key(item):  # operating_point.choice_key: Dice, then Youden's J, then the simpler setting
        p, s = item
        return choice_key(s["per_patient_dice_mean"], s["detection_sensitivity"], s["detection_specificity"],
                          p["tta"], p["postprocess"], p["min_tumour_area"])
    best, best_scores = max(grid, key=key)

    def row(name: str, point: dict[str, Any], gate: bool = True) -> dict[str, Any]:
        return {"name": name, **point, "gate": gate, **score(raws[point["tta"]], point_of(point, gate))}

    base = {"tta": False, "threshold": 0.5, "min_tumour_area": 0.0, "postprocess": "none"}
    classifier_gate_only = [(p, s) for p, s in grid
                            if p["min_tumour_area"] == 0 and p["postprocess"] == "none" and not p["tta"]]
    best_threshold = max(classifier_gate_only, key=key)[0]  # the same rule as the chosen point, ties included
    area = best["min_tumour_area"] or MIN_AREAS[1]  # the classifier-off row needs an area for its calls
    ablation = [
        row("segmenter alone (no gate)", base, gate=False),
        row("segmenter alone + post-processing (no gate)", {**base, "postprocess": best["postprocess"]}, gate=False),
        row("classifier gate at 0.5", base),
        row("classifier gate, tuned threshold", best_threshold),
        row("chosen operating point", best),
        row("chosen, without post-processing", {**best, "postprocess": "none"}),
        # The rule the first release used, for the record: not a candidate, since it can erase a real tumour.
        row("chosen, with the largest component instead", {**best, "postprocess": "largest_component"}),
        row("chosen, without flip TTA", {**best, "tta": False}),
        row("chosen, without the fused gate", {**best, "min_tumour_area": 0.0}),
        # The classifier's share: the same pipeline with slice calls from the segmenter's area alone.
        row("classifier off (area-only calls)", {**best, "threshold": CLASSIFIER_OFF, "min_tumour_area": area}),
    ]
    return {
        **best, "gate": True, "mask_threshold": mask_threshold,
        "tuned_on": {
            "patients": list(patient_ids),
            "split": source,
            "criterion": "mean per-patient volumetric Dice of the whole pipeline (empty-vs-empty patients excluded); "
                         "ties (equal to 4 decimals) to the higher Youden's J of the slice calls, then to the simpler "
                         "setting",
            "grid": {"threshold": list(thresholds), "min_tumour_area": list(MIN_AREAS),
                     "postprocess": list(SAFE_POSTPROCESS_RULES), "tta": [False, True]},
            "note": "chosen and scored on the same validation patients: optimistic for unseen patients",
        },
        "validation": best_scores,
        "ablation": ablation,
    }


def tuning_patients(checkpoints: Path, pipeline: Pipeline, given: Sequence[str] | None) -> tuple[list[str], str]:
    """(patient ids, where they come from): `given` (--patients), none of which either model trained on, else the
    segmenter's recorded validation patients. A checkpoint with none (e.g. `train.py --fold all`) is an error."""
    if given:
        trained = set()
        for meta in pipeline.metadata.values():  # the leakage guard's record, else the split's training patients
            trained |= set(meta.get("trained_patients") or (meta.split or {}).get("train") or [])
        if seen := sorted(set(given) & trained):
            raise ValueError(f"--patients: {len(seen)} of them trained the checkpoints in {checkpoints} (e.g. "
                             f"{seen[0]}); tune on patients neither model trained on")
        return list(dict.fromkeys(given)), "--patients (given on the command line)"
    val = list((pipeline.metadata["segmenter"].split or {}).get("val") or [])
    if not val:
        raise ValueError(
            f"{checkpoints / 'segmenter'}: its metadata records no validation patients (it trained on every patient, "
            "e.g. train.py --fold all): pass --patients ID ... (patients neither model trained on), or use the "
            "operating point cross-validation chose (OUT/pipeline.json of python -m flaxtumor.crossval)")
    return val, VAL_PATIENTS


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flaxtumor.tune", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="kaggle_3m folder (or its parent), or 'synthetic'")
    ap.add_argument("--checkpoints", default="checkpoints", type=Path, help="folder with classifier/ and segmenter/")
    ap.add_argument("--out", type=Path, default=None, help=f"where to write (default: CHECKPOINTS/{OPERATING_POINT_FILE})")
    ap.add_argument("--patients", nargs="+", metavar="ID",
                    help="tune on these patients (none either model trained on) instead of the segmenter's recorded "
                         "validation patients; needed for a model trained on every patient (train.py --fold all)")
    ap.add_argument("--thresholds", type=float, nargs="+", default=list(THRESHOLDS), metavar="T",
                    help="the classifier thresholds to search (default: 0.05, 0.10, ..., 0.95)")
    args = ap.parse_args(argv)
    if not all(0.0 <= t <= 1.0 for t in args.thresholds):
        print(f"error: --thresholds must lie in [0, 1], got {args.thresholds}", file=sys.stderr)
        return 2
    if problem := missing_checkpoints(args.checkpoints):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        # Raw outputs depend only on the mask threshold and TTA (set per call); the rest is searched, so a previous
        # pipeline.json's threshold, area and post-processing play no part.
        pipeline = Pipeline.from_checkpoints(args.checkpoints)
        ids, source = tuning_patients(args.checkpoints, pipeline, args.patients)
        data_cfg = dataclasses.replace(pipeline.metadata["segmenter"].config.data, root=str(args.data), split_file=None)
        patients = select(load_dataset(data_cfg), ids)
    except (ValueError, OSError) as e:  # DataError and CheckpointError are ValueErrors with one clear line
        print(f"error: {e}", file=sys.stderr)
        return 2
    point = tune(pipeline, patients, sorted(set(args.thresholds)), source)
    out = args.out or args.checkpoints / OPERATING_POINT_FILE
    chosen = flag_at_classifier_threshold(OperatingPoint.from_dict(point), pipeline.metadata["classifier"].threshold)
    fields = set(chosen.to_dict()) | {"lcc", "postprocess"}  # the point itself, however to_dict spells the rule
    write_operating_point(out, chosen, **{k: v for k, v in point.items() if k not in fields})
    v = point["validation"]
    print(f"chosen on {len(patients)} patients ({source}): threshold {point['threshold']}, min_tumour_area "
          f"{point['min_tumour_area']}, post-processing {point['postprocess']}, tta {point['tta']} → per-patient Dice mean "
          f"{v['per_patient_dice_mean']:.4f} → {out}")
    for r in point["ablation"]:
        print(f"  {r['name']:<44} per-patient Dice {r['per_patient_dice_mean']:.4f}  detection acc "
              f"{r['detection_accuracy']:.4f} sens {r['detection_sensitivity']:.4f} spec {r['detection_specificity']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

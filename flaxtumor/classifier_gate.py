"""`python -m flaxtumor.classifier_gate --cv OUT --data PATH`: whether the classifier should gate the segmenter, decided
on patients that neither model trained on.

Cross-validation (`flaxtumor.crossval`) chooses the pipeline's post-processing with the classifier off: it has an
out-of-fold segmenter prediction for every patient, but no out-of-fold classifier probabilities. The classifier held
out patients of its own: its validation split, which chose its epochs but never trained it. On those patients the
out-of-fold segmenter masks and the classifier's probabilities are both unseen, so the gate is decided there, with one
knob: the classifier threshold (its calls alone, or fused with the cross-validated area gate), the mask threshold and
post-processing fixed at the cross-validated point. Candidates are ranked by `operating_point.choice_key` (mean
per-patient Dice to 4 decimals, then Youden's J of the tumour verdicts: a slice is called tumour when its final mask
outlines a region); on a full tie the classifier stays off, the point with fewer knobs.

Writes the cross-validated point, with the threshold if the gate won, and the comparison under `classifier_gate`.
A gate threshold is a Dice knob, not the classifier's decision: the gate can sit far below it (it only empties masks
on slices the classifier is sure are clear). So when the gate wins, slices are flagged "suspicious" at the classifier
checkpoint's own threshold (`flag_threshold`; not searched), not at the gate's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from flaxtumor.operating_point import (OPERATING_POINT_FILE, OperatingPoint, choice_key,
                                       flag_at_classifier_threshold, read_operating_point, write_operating_point)

GATE_FILE = "pipeline_gate.json"


def held_out_patients(classifier_metadata: Any) -> list[str]:
    """The classifier's validation patients that nothing in its lineage trained on (its own training, the patients
    its backbone was pretrained on); an error when none is left."""
    split = classifier_metadata.split or {}
    trained = set(classifier_metadata.get("trained_patients") or split.get("train") or [])
    trained |= set((classifier_metadata.get("backbone_provenance") or {}).get("patients") or [])
    held = [pid for pid in split.get("val") or [] if pid not in trained]
    if not held:
        raise ValueError("the classifier's metadata records no validation patient that it (or its backbone) did not "
                         "train on: there is nowhere to decide its gate without leakage")
    return held


def gate_candidates(point: OperatingPoint, thresholds: Sequence[float]) -> list[OperatingPoint]:
    """The cross-validated point with the classifier off; then, at each threshold, the classifier's calls alone gating
    the masks (the only gate that can empty a false region on a slice the classifier clears) and, when the point has
    an area gate, the fused gate (classifier or area: it can only keep masks the area gate would drop)."""
    off = point.override(threshold=math.inf)
    areas = (0.0, point.min_tumour_area) if point.gate and point.min_tumour_area > 0 else (0.0,)
    return [off, *(off.override(threshold=t, gate=True, min_tumour_area=a) for a in areas for t in thresholds)]


def verdict_scores(raw: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], point: OperatingPoint) -> dict[str, float]:
    """Sensitivity and specificity of the tumour verdicts over all slices: a slice is called tumour when its final
    mask (gated, post-processed) outlines a region, as crossval scores its candidates and as the app answers a user.
    (`tune.score`'s detection_* are the classifier's flags instead, which say nothing when it is off.)"""
    from flaxtumor.metrics import call_rates
    from flaxtumor.operating_point import gate_and_postprocess

    drawn, labels = [], []
    for probs, masks, truth in raw:
        _, final = gate_and_postprocess(probs, masks, point)
        drawn.append(final.any(axis=(1, 2)))
        labels.append(truth.any(axis=(1, 2)))
    sensitivity, specificity = call_rates(np.concatenate(drawn), np.concatenate(labels))
    return {"verdict_sensitivity": sensitivity, "verdict_specificity": specificity}


def choose_gate(raw: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], point: OperatingPoint,
                thresholds: Sequence[float]) -> dict[str, Any]:
    """Scores every candidate on `raw` ((classifier probabilities, ungated out-of-fold masks, truth) per patient) and
    returns {"candidates": rows, "chosen": the best row, "point": its OperatingPoint}."""
    from flaxtumor.tune import score

    rows, candidates = [], gate_candidates(point, thresholds)
    for candidate in candidates:
        rows.append({"threshold": candidate.threshold, "min_tumour_area": candidate.min_tumour_area,
                     "gate": candidate.gate, **score(raw, candidate), **verdict_scores(raw, candidate)})

    def key(i: int) -> tuple:  # the verdicts, not the classifier's flags: with the classifier off it flags nothing
        r = rows[i]
        return (*choice_key(r["per_patient_dice_mean"], r["verdict_sensitivity"], r["verdict_specificity"],
                            point.tta, point.postprocess, point.min_tumour_area), math.isinf(r["threshold"]))

    best = max(range(len(rows)), key=key)
    return {"candidates": rows, "chosen": rows[best], "point": candidates[best]}


def flag_rates(raw: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], point: OperatingPoint) -> dict[str, float]:
    """How often the classifier flags a slice at the point's flag threshold: tumour slices (sensitivity) and
    tumour-free slices (1 - specificity: the "suspicious" a user sees wherever nothing is outlined)."""
    from flaxtumor.metrics import call_rates

    flags = np.concatenate([point.flags(probs) for probs, _, _ in raw])
    labels = np.concatenate([truth.any(axis=(1, 2)) for _, _, truth in raw])
    sensitivity, specificity = call_rates(flags, labels)
    return {"flag_threshold": point.effective_flag_threshold, "flags_tumour_slices": sensitivity,
            "flags_tumour_free_slices": 1.0 - specificity}


def some_segmenter(cv: Path, fold: int) -> Path:
    """A fold model of the cross-validation, only to complete the pipeline (only its classifier runs here): CV's own,
    or for a seed ensemble's cross-validation (`crossval_ensemble`) its first member's."""
    from flaxtumor.crossval import CV_FILE, export_path

    path = export_path(cv, fold, "seg")
    report = Path(cv) / CV_FILE
    if path.is_dir() or not report.is_file():
        return path
    members = json.loads(report.read_text()).get("members") or []
    return export_path(Path(members[0]), fold, "seg") if members else path


def gate_inputs(cv: Path, checkpoints: Path, data: str, patient_ids: Sequence[str], point: OperatingPoint
                ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per patient: the classifier's probabilities (the classifier in CHECKPOINTS, at the point's TTA setting), the
    fold model's ungated out-of-fold masks at the slices' size (at the point's mask threshold), and the truth."""
    from flaxtumor.crossval import OOF_DIR
    from flaxtumor.oof import load_oof, oof_masks
    from flaxtumor.data.lgg import load_dataset, select
    from flaxtumor.evaluate import load_volume
    from flaxtumor.inference import Pipeline

    oof = {pid: load_oof(Path(cv) / OOF_DIR / f"{pid}.npz") for pid in patient_ids}
    pipeline = Pipeline.from_checkpoints(checkpoints, segmenter=some_segmenter(cv, oof[patient_ids[0]].fold))
    config = dataclasses.replace(pipeline.metadata["classifier"].config.data, root=str(data), split_file=None)
    patients = select(load_dataset(config), list(patient_ids))
    raw = []
    for patient in patients:
        images, truth = load_volume(patient)
        probs = pipeline.tumour_probabilities(images, volume=True, point=point)
        masks, _ = oof_masks(oof[patient.patient_id], patient, point.mask_threshold)
        raw.append((probs, masks, truth))
    return raw


def main(argv: Sequence[str] | None = None) -> int:
    from flaxtumor.checkpoint_metadata import read_metadata
    from flaxtumor.tune import THRESHOLDS

    ap = argparse.ArgumentParser(prog="python -m flaxtumor.classifier_gate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cv", type=Path, required=True, help="a finished python -m flaxtumor.crossval folder (seg)")
    ap.add_argument("--data", required=True, help="kaggle_3m folder (or its parent)")
    ap.add_argument("--checkpoints", type=Path, default=Path("checkpoints"), help="folder with the classifier/ to gate")
    ap.add_argument("--out", type=Path, default=None, help=f"where to write (default: CV/{GATE_FILE})")
    args = ap.parse_args(argv)
    try:
        point, record = read_operating_point(args.cv)
        if not record:
            raise ValueError(f"{args.cv / OPERATING_POINT_FILE}: missing (run python -m flaxtumor.crossval first)")
        classifier = read_metadata(args.checkpoints / "classifier")
        patients = held_out_patients(classifier)
        raw = gate_inputs(args.cv, args.checkpoints, args.data, patients, point)
    except (ValueError, OSError) as e:  # DataError and CheckpointError are ValueErrors with one clear line
        print(f"error: {e}", file=sys.stderr)
        return 2
    choice = choose_gate(raw, point, THRESHOLDS)
    chosen_point = flag_at_classifier_threshold(choice["point"], classifier.threshold)
    flags = flag_rates(raw, chosen_point)
    gate = {
        "patients": patients,
        "protocol": "the classifier's validation patients (never trained on by it or its backbone; they chose its "
                    "epochs), each segmented out of fold as the cross-validation predicted it; one knob searched, the "
                    "classifier threshold (its calls alone, or fused with the area gate), the rest fixed at the "
                    "cross-validated point; best mean per-patient Dice, "
                    "then Youden's J of the tumour verdicts (a mask drawn), then the classifier off",
        "classifier": str(args.checkpoints / "classifier"),
        "candidates": choice["candidates"],
        "chosen": choice["chosen"],
        **({"flags": {**flags,
                      "from": "the classifier checkpoint's own threshold (not searched): the gate threshold empties "
                              "masks; a slice with nothing outlined is called suspicious only at this one"}}
           if chosen_point.flag_threshold is not None else {}),
    }
    out = args.out or args.cv / GATE_FILE
    kept = {k: v for k, v in record.items() if k not in {f.name for f in dataclasses.fields(point)} | {"lcc"}}
    if not math.isinf(choice["point"].threshold):
        kept["validation_of"] = "the cross-validated point with the classifier off (all patients, out of fold)"
    write_operating_point(out, chosen_point, **kept, classifier_gate=gate)
    off, chosen = choice["candidates"][0], choice["chosen"]
    print(f"{len(patients)} patients neither model trained on: classifier off → per-patient Dice "
          f"{off['per_patient_dice_mean']:.4f}; chosen: {chosen_point.threshold_label} → "
          f"{chosen['per_patient_dice_mean']:.4f} (tumour verdicts: sensitivity {chosen['verdict_sensitivity']:.3f}, "
          f"specificity {chosen['verdict_specificity']:.3f}); suspicious flags at {chosen_point.flag_label}: "
          f"{flags['flags_tumour_free_slices']:.3f} of tumour-free slices → {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

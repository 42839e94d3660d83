"""`python -m flaxtumor.evaluate --data PATH --checkpoints DIR [--split FILE | --patients ID ...] [--subset val]
--out DIR`

Writes `DIR/metrics.json` (metrics + the protocol that produced them) and PNGs: confusion matrix, ROC, reliability
diagram, per-patient Dice bars, and a gallery of the best and worst slices.

Which patients: `--patients` as given; else the `--subset` (default val) of `--split FILE`; else of the split recorded
in the segmenter checkpoint, so evaluate reproduces training's validation numbers. Every patient is run as a volume
(volume normalisation, optional 3D LCC), exactly as `Pipeline.predict_volume` does.

Three views:
- classifier: every slice, tumour = any mask pixel; plus its Grad-CAM pointing score (`classifier.gradcam`: the share
  of tumour slices with >= 200 true pixels whose map peaks inside the true mask dilated by 8 px);
- segmenter alone: the tumour slices only, ungated, no LCC (and, under `all_slices`, every slice: what training's
  validation reports);
- pipeline: classifier gate → segmenter → optional LCC over all slices of each patient; its `verdict` block scores
  what a user is told (tumour = a mask is drawn; suspicious = flagged by the classifier, nothing drawn) against the
  truth, beside the raw classifier (`classifier`) and the pre-post-processing calls (`detection`). Headline: per-patient
  volumetric Dice (patients with no tumour in truth and none predicted are listed, not scored); tumour-slice Dice
  (empty-vs-empty slices excluded, never 1); pooled Dice/IoU/pixel accuracy over every pixel, labelled "pooled".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from flaxtumor import metrics, plots
from flaxtumor.checkpoint_metadata import InferenceMetadata
from flaxtumor.data.io import DataError, read_image, read_mask
from flaxtumor.data.lgg import Patient, Split, load_dataset, load_split, select
from flaxtumor.data.preprocess import sequence_group
from flaxtumor.inference import Pipeline
from flaxtumor.operating_point import OperatingPoint, gate_and_postprocess, jsonable

EMPTY_SLICE_RULE = (
    "dice/iou of an empty prediction against an empty truth is undefined, never 1: such slices are excluded from "
    "slice means and such patients from per-patient means (listed in empty_both_patients); a false-positive or "
    "missed slice scores 0"
)
POOLED_RULE = "pooled = pixel counts summed over every evaluated slice before dividing (the seed's metric)"


@dataclasses.dataclass
class _Ranked:
    """Keeps the k best and k worst pipeline slices (with their pixels) while streaming patients."""

    k: int
    items: list[tuple[float, int, plots.GalleryItem]] = dataclasses.field(default_factory=list)

    def offer(self, score: float, area: int, item: plots.GalleryItem) -> None:
        self.items.append((score, area, item))
        ranked = sorted(self.items, key=lambda t: (t[0], -t[1]))  # ties: larger tumours first, they are clearer
        self.items = ranked[: self.k] + ranked[max(self.k, len(ranked) - self.k) :]

    def best_and_worst(self) -> list[plots.GalleryItem]:
        ranked = sorted(self.items, key=lambda t: (t[0], -t[1]))
        worst = ranked[: self.k]
        best = sorted(ranked[self.k :], key=lambda t: (-t[0], -t[1]))
        label = lambda tag, item: dataclasses.replace(item, title=f"{tag}: {item.title}")  # noqa: E731
        return [label("best", t[2]) for t in best] + [label("worst", t[2]) for t in worst]


def load_volume(patient: Patient) -> tuple[list[np.ndarray], np.ndarray]:
    """A patient's slices (uint8 HxWx3, in order) and its ground-truth volume (D, H, W) bool."""
    images, targets = [], []
    for s in patient.slices:
        if s.mask_path is None:
            raise DataError(s.image_path, "no mask: evaluation needs the ground truth of every slice")
        images.append(read_image(s.image_path))
        targets.append(read_mask(s.mask_path))
    return images, np.stack(targets)


_CALL_METRICS = ("accuracy", "precision", "recall", "specificity", "f1", "tn", "fp", "fn", "tp")


def _slice_calls(probs: np.ndarray, labels: np.ndarray, calls: np.ndarray, drawn: np.ndarray, point: OperatingPoint
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(detection, verdict) over all slices. Detection: the pipeline's slice calls, the classifier's alone or fused
    with the segmenter's area (min_tumour_area > 0). Verdict, what a user sees: "tumour" exactly when a mask is drawn
    (after gating and post-processing), "suspicious" when the classifier flags the slice and nothing is drawn; scored
    as tumour vs not, with the verdicts counted."""
    detection = metrics.classification_metrics(calls.astype(float), labels, 0.5)
    verdict = metrics.classification_metrics(drawn.astype(float), labels, 0.5)
    detection, verdict = ({k: m[k] for k in _CALL_METRICS} for m in (detection, verdict))
    flagged = point.flags(probs)
    suspicious = flagged & ~drawn
    verdict["counts"] = {"tumour": int(drawn.sum()), "suspicious": int(suspicious.sum()),
                         "no tumour": int((~drawn & ~flagged).sum())}
    verdict["suspicious_with_tumour_in_truth"] = int((suspicious & labels).sum())
    verdict["flagged_at"] = point.flag_label
    return detection, verdict


def _classifier_metrics(pipeline: Pipeline, probs: np.ndarray, labels: np.ndarray, point: OperatingPoint
                        ) -> dict[str, Any]:
    """The classifier's slice metrics where it flags slices (`OperatingPoint.flags`: the pipeline's flag threshold,
    unset its gate threshold). With the classifier off (an infinite threshold: it flags nothing) calls at that
    threshold say nothing about it, so its own checkpoint threshold is used instead."""
    off = math.isinf(point.threshold)
    classifier = metrics.classification_metrics(probs, labels, pipeline.metadata["classifier"].threshold if off
                                                else point.effective_flag_threshold)
    classifier["threshold_from"] = ("classifier checkpoint (the pipeline's classifier is off)" if off else
                                    "pipeline (its flag threshold)" if point.flags_apart else "pipeline")
    return classifier


@dataclasses.dataclass
class _SegmenterTally:
    """The segmenter alone (no gate, no post-processing): on the tumour slices, and on every slice (the definitions
    of training's validation metrics, see the protocol)."""

    dice: list[float] = dataclasses.field(default_factory=list)
    iou: list[float] = dataclasses.field(default_factory=list)
    counts: metrics.PixelCounts = dataclasses.field(default_factory=metrics.PixelCounts)
    every_dice: list[float] = dataclasses.field(default_factory=list)
    every_counts: metrics.PixelCounts = dataclasses.field(default_factory=metrics.PixelCounts)
    per_patient: dict[str, float] = dataclasses.field(default_factory=dict)

    def add(self, patient_id: str, masks: np.ndarray, truth: np.ndarray) -> None:
        tumour = np.flatnonzero(truth.any(axis=(1, 2)))
        self.dice += [metrics.dice(masks[i], truth[i]) for i in tumour]
        self.iou += [metrics.iou(masks[i], truth[i]) for i in tumour]
        self.counts += metrics.PixelCounts.from_masks(masks[tumour], truth[tumour])
        self.every_dice += [metrics.dice(m, t) for m, t in zip(masks, truth)]
        self.every_counts += metrics.PixelCounts.from_masks(masks, truth)
        self.per_patient.update(metrics.volumetric_dice_per_patient({patient_id: masks}, {patient_id: truth}))

    def report(self) -> dict[str, Any]:
        return {
            "n_slices": len(self.dice),
            "dice_mean": metrics.mean_over_scored(self.dice),
            "iou_mean": metrics.mean_over_scored(self.iou),
            "pooled_dice": self.counts.dice,
            "pooled_iou": self.counts.iou,
            "all_slices": {
                "per_patient_dice": metrics.summarise_patient_dice(self.per_patient),
                "tumour_slice_dice": metrics.mean_over_scored(self.every_dice),
                "pooled_dice": self.every_counts.dice,
            },
        }


def evaluate_patients(
    pipeline: Pipeline, patients: Sequence[Patient], point: OperatingPoint | None = None, gallery_size: int = 4
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics, plot data) for the pipeline at `point` (default: its own) on these patients; see the module
    docstring for the three views."""
    point = point or pipeline.point
    probs_all, labels_all, calls_all, drawn_all = [], [], [], []
    segmenter = _SegmenterTally()
    slice_dice, slice_iou, pipe_counts = [], [], metrics.PixelCounts()
    per_patient: dict[str, float] = {}
    sequences: dict[str, str] = {}  # which MRI sequences each patient has (a FLAIR-only one is a known weak spot)
    loss_parts: dict[str, dict[str, float]] = {}  # where each patient's Dice goes (metrics.dice_loss_parts)
    heatmaps, heat_targets = [], []  # Grad-CAM pointing: tumour slices large enough to score
    ranked = _Ranked(gallery_size)
    for patient in tqdm(patients, unit="patient", desc="evaluate"):
        images, target_vol = load_volume(patient)
        sequences[patient.patient_id] = sequence_group(np.stack(images))
        probs = pipeline.tumour_probabilities(images, volume=True, point=point)
        seg_vol = np.stack(pipeline.segment(images, volume=True, point=point))
        calls, final = gate_and_postprocess(probs, seg_vol, point)
        labels = target_vol.any(axis=(1, 2))
        probs_all.append(probs)
        labels_all.append(labels)
        calls_all.append(calls)
        drawn_all.append(final.any(axis=(1, 2)))

        large = np.flatnonzero(target_vol.sum(axis=(1, 2)) >= metrics.POINTING_MIN_PIXELS)
        heatmaps += [pipeline.gradcam(images[i]) for i in large]
        heat_targets += [target_vol[i] for i in large]
        segmenter.add(patient.patient_id, seg_vol, target_vol)
        per_patient.update(metrics.volumetric_dice_per_patient({patient.patient_id: final},
                                                               {patient.patient_id: target_vol}))
        loss_parts[patient.patient_id] = metrics.dice_loss_parts(final, target_vol)
        pipe_counts += metrics.PixelCounts.from_masks(final, target_vol)
        for s, image, pred, target, p in zip(patient.slices, images, final, target_vol, probs):
            d = metrics.dice(pred, target)
            slice_dice.append(d)
            slice_iou.append(metrics.iou(pred, target))
            if not np.isnan(d):
                title = f"{s.patient_id} #{s.slice_index}\ndice {d:.3f}, P(tumour) {p:.2f}"
                ranked.offer(d, int(target.sum()), plots.GalleryItem(title, image, target, pred))

    probs, labels = np.concatenate(probs_all), np.concatenate(labels_all)
    detection, verdict = _slice_calls(probs, labels, np.concatenate(calls_all), np.concatenate(drawn_all), point)
    result = {
        "classifier": {**_classifier_metrics(pipeline, probs, labels, point),
                       # Does its Grad-CAM (the map predict --gradcam and the app show) point at the tumour?
                       "gradcam": metrics.pointing_score(heatmaps, heat_targets)},
        "segmenter": segmenter.report(),
        "pipeline": {
            "detection": detection,  # slice calls before post-processing: the classifier's, or fused with the area
            "verdict": verdict,
            "per_patient_dice": metrics.summarise_patient_dice(per_patient),
            "per_patient": per_patient,
            "by_sequences": metrics.dice_by_group(per_patient, sequences),
            "dice_loss": {"mean": metrics.mean_dice_loss_parts(loss_parts), "per_patient": loss_parts},
            "tumour_slice_dice": metrics.mean_over_scored(slice_dice),
            "tumour_slice_iou": metrics.mean_over_scored(slice_iou),
            "n_scored_slices": int(np.sum(~np.isnan(slice_dice))),
            "pooled_dice": pipe_counts.dice,
            "pooled_iou": pipe_counts.iou,
            "pooled_pixel_accuracy": pipe_counts.pixel_accuracy,
        },
    }
    fpr, tpr, _ = metrics.roc_curve(probs, labels)
    plot_data = {"fpr": fpr, "tpr": tpr, "gallery": ranked.best_and_worst()}
    return result, plot_data


def write_plots(result: dict[str, Any], plot_data: dict[str, Any], out: Path) -> list[str]:
    c = result["classifier"]
    written = [plots.confusion_matrix(c["confusion_matrix"], out / "confusion_matrix.png")]
    if not math.isnan(c["auc"]):  # one class only: no ROC to draw
        point = (1 - c["specificity"], c["recall"])
        written.append(plots.roc(plot_data["fpr"], plot_data["tpr"], c["auc"], point, out / "roc.png"))
    written.append(plots.reliability(c["calibration"], out / "reliability.png"))
    written.append(plots.patient_dice(result["pipeline"]["per_patient"], out / "patient_dice.png"))
    if plot_data["gallery"]:
        written.append(plots.gallery(plot_data["gallery"], out / "gallery.png"))
    return [p.name for p in written]


def trained_on(metadata: InferenceMetadata) -> set[str]:
    """The patients a checkpoint trained on: its recorded `trained_patients`, else its split's train part."""
    return set(metadata.extra.get("trained_patients") or (metadata.split or {}).get("train") or [])


def missing_checkpoints(path: Path) -> str | None:
    """The error for a --checkpoints folder that does not exist, or None. The default is relative to the current
    folder, so the message says where to run from instead of suggesting a training run."""
    if Path(path).is_dir():
        return None
    return (f"--checkpoints {path}: no such checkpoint folder (the default 'checkpoints' is relative: run from the "
            "repository root, where the shipped checkpoints/ lives, or pass --checkpoints PATH/TO/checkpoints)")


def _choose_patients(
    args: argparse.Namespace, patients: list[Patient], recorded: dict[str, Any] | None
) -> tuple[list[Patient], str]:
    if args.patients:
        return select(patients, args.patients), "--patients"
    if args.split:
        split, source = load_split(args.split), f"file:{args.split}"
    elif recorded:
        split, source = Split.from_dict({**recorded, "seed": recorded.get("seed", -1)}), "segmenter checkpoint"
    else:
        raise ValueError("the segmenter checkpoint records no split: pass --split FILE or --patients ID ...")
    ids = split.train + split.val + split.test if args.subset == "all" else getattr(split, args.subset)
    if not ids:  # e.g. the val subset of a model trained on every patient (train.py --fold all)
        where = source if args.split else f"{source} {Path(args.checkpoints) / 'segmenter'}"
        raise ValueError(f"the {args.subset} subset of the split ({where}) is empty: pass --patients ID ... or "
                         "--split FILE")
    known = {p.patient_id for p in patients}
    missing = sorted(set(ids) - known)
    if missing and str(args.data) == "synthetic" and not args.split:
        # The shipped checkpoints record real patients; a synthetic smoke run has none of them, so it scores every
        # synthetic patient (none was trained on: the models never saw synthetic data).
        print(f"note: the {source}'s {args.subset} patients are not in the synthetic set: evaluating all "
              f"{len(patients)} synthetic patients", file=sys.stderr)
        return list(patients), "all synthetic patients (the checkpoint's split names other patients)"
    if missing:
        raise ValueError(f"{len(missing)} patient id(s) of the {source}'s {args.subset} subset are not in "
                         f"{args.data}: {missing[:5]}; pass --split FILE or --patients ID ... for this data")
    return select(patients, ids), f"{source} ({args.subset})"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m flaxtumor.evaluate", description=__doc__.split("\n\n")[1])
    ap.add_argument("--data", required=True, help="kaggle_3m folder (or its parent), or 'synthetic'")
    ap.add_argument("--checkpoints", default="checkpoints", type=Path)
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--split", type=Path, help="split JSON (default: the split recorded in the checkpoint)")
    which.add_argument("--patients", nargs="+", metavar="ID", help="evaluate exactly these patient ids")
    ap.add_argument("--subset", choices=("val", "test", "all"), default="val", help="which part of the split")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--threshold", type=float, default=None,
                    help="tumour gate (default: the checkpoints' pipeline.json, else the classifier's)")
    ap.add_argument("--lcc", action=argparse.BooleanOptionalAction, default=None,
                    help="3D largest connected component per patient (default: the checkpoints' pipeline.json)")
    ap.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                    help="horizontal-flip test-time augmentation (default: the checkpoints' pipeline.json)")
    ap.add_argument("--no-gate", action="store_true", help="segment every slice (ablation of the classifier gate)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--gallery", type=int, default=4, metavar="K", help="K best and K worst slices in gallery.png")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    started = time.time()
    if problem := missing_checkpoints(args.checkpoints):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        pipeline = Pipeline.from_checkpoints(
            args.checkpoints, threshold=args.threshold, gate=False if args.no_gate else None, tta=args.tta, lcc=args.lcc,
            batch_size=args.batch_size,
        )
        point = pipeline.point
        seg_meta, cls_meta = pipeline.metadata["segmenter"], pipeline.metadata["classifier"]
        # The data section of the training config (synthetic generator settings included), pointed at --data.
        data_cfg = dataclasses.replace(seg_meta.config.data, root=args.data, split_file=None)
        patients, source = _choose_patients(args, load_dataset(data_cfg), seg_meta.split)
    except (ValueError, OSError) as e:  # DataError and CheckpointError are ValueErrors with one clear line
        print(f"error: {e}", file=sys.stderr)
        return 2

    ids = [p.patient_id for p in patients]
    leaked = {name: sorted(set(ids) & trained_on(meta)) for name, meta in pipeline.metadata.items()}
    for name, overlap in leaked.items():
        if overlap:  # e.g. a segmenter trained on every patient (train.py --fold all): its scores here flatter it
            print(f"warning: {len(overlap)} evaluated patient(s) trained the {name} ({', '.join(overlap[:3])}"
                  f"{', ...' if len(overlap) > 3 else ''}): its scores on them are optimistic", file=sys.stderr)

    try:
        result, plot_data = evaluate_patients(pipeline, patients, point, args.gallery)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result["protocol"] = {
        "data": str(args.data),
        "checkpoints": str(args.checkpoints),
        "patients_from": source,
        "patients": ids,
        "n_patients": len(ids),
        "n_slices": int(sum(len(p.slices) for p in patients)),
        "n_tumour_slices": int(sum(s.has_tumour for p in patients for s in p.slices)),
        "threshold": point.threshold,
        "threshold_from": "--threshold" if args.threshold is not None
        else "pipeline.json" if "threshold" in pipeline.record else "classifier checkpoint",
        "operating_point": pipeline.record,
        "mask_threshold": point.mask_threshold,
        "gate": point.gate,
        "lcc": point.lcc,
        "postprocess": point.postprocess,
        "min_tumour_area": point.min_tumour_area,
        "lcc_connectivity": "3D, 26-neighbourhood, largest component per patient",
        "tta": point.tta,
        "preprocessing": {"classifier": cls_meta.preprocessing.to_dict(), "segmenter": seg_meta.preprocessing.to_dict()},
        "volume_normalisation": "volume_zscore statistics over each patient's full stack",
        "masks_scored_at": "input resolution (probabilities resized back bilinearly, then thresholded); training's "
        "validation metrics score at the model resolution instead, so they differ slightly",
        "segmenter_all_slices": "segmenter alone, ungated, no LCC, every slice: the definitions training uses for "
        "the segmenter's validation metrics (volumetric_dice = per_patient_dice.mean, dice = tumour_slice_dice)",
        "empty_slice_rule": EMPTY_SLICE_RULE,
        "pooled_rule": POOLED_RULE,
        "classifier_train_overlap": leaked["classifier"],
        "segmenter_train_overlap": leaked["segmenter"],
    }
    result["checkpoint_metrics"] = {"classifier": cls_meta.metrics, "segmenter": seg_meta.metrics}
    args.out.mkdir(parents=True, exist_ok=True)
    result["plots"] = write_plots(result, plot_data, args.out)
    result["seconds"] = round(time.time() - started, 1)
    (args.out / "metrics.json").write_text(json.dumps(jsonable(result), indent=2) + "\n")

    headline = result["pipeline"]["per_patient_dice"]
    print(
        f"{len(ids)} patients: per-patient Dice mean {headline['mean']:.4f} median {headline['median']:.4f} "
        f"min {headline['min']:.4f}; tumour-slice Dice {result['pipeline']['tumour_slice_dice']:.4f}; "
        f"classifier AUC {result['classifier']['auc']:.4f} accuracy {result['classifier']['accuracy']:.4f} "
        f"→ {args.out / 'metrics.json'}"
    )
    print(f"  {metrics.describe_dice_loss(result['pipeline']['dice_loss']['mean'])} (mean over patients; with the "
          f"Dice they sum to 1)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m flaxtumor.predict INPUT [INPUT ...] --out DIR [--checkpoints DIR] [--threshold T] [--no-gate]
[--truth SEG | --no-truth]`

Output contract (scripts depend on it):
- `DIR/<image stem>_pred.png` for every readable image input: uint8 0/255, the same height and width as that input;
- `DIR/<case>_pred.nii.gz` for every readable NIfTI case: uint8 0/1 on the input's grid, with its affine and header;
- with `--gradcam GDIR`, `GDIR/<image stem>_gradcam.png` too (`<case>_z<k>_gradcam.png` per NIfTI slice): the
  classifier's Grad-CAM, 8-bit grayscale, same size;
- `DIR/predictions.csv`, header `image,tumour_probability,has_tumour,tumour_pixels,verdict,classifier_call,patient,
  warning`: one row per predicted slice, image inputs in input order, then the NIfTI cases' slices (see `CSV_HEADER`
  and the README for each column). When any input has ground truth, two columns follow: `true_pixels,dice`
  (`truth.TRUTH_COLUMNS`; blank for a slice without truth, Dice blank when empty vs empty), and
  `DIR/patients.csv` (`truth.PATIENTS_HEADER`) holds each patient volume's volumetric Dice, also printed on stderr.

INPUTs are image files, NIfTI volumes and/or folders searched recursively. Files named `*_mask.*` are never inputs:
they are the ground truth of the image they extend (`X_mask.tif` for `X.tif`, same folder), unless `--no-truth`; a
mask without its image is an error. NIfTI: see `flaxtumor.predict_nifti` for which files form one case; a truth
segmentation named `*_seg*`/`*_mask*` beside the volumes, or `--truth SEG` for the one case given, is its ground truth.
Two inputs with the same stem (two cases with one name) are refused before any work. An unreadable input is reported
by name with its problem, on one line; the others are still written and the exit status is 1, with the failures
listed. Usage errors (duplicate stems, no inputs, bad checkpoints, `--truth` without exactly one NIfTI case) exit 2.

Slices are grouped into patient volumes: a folder whose every slice is `<folder name>_<n>.<ext>`, and, in any folder,
the slices named with one kaggle-style patient prefix (`TCGA_XX_NNNN_YYYYMMDD_<n>`); a NIfTI case is one volume.
Each volume is predicted on its own with `Pipeline.predict_volume` (volume normalisation as in training, its own
post-processing, e.g. `--lcc`), so a patient's Dice is `evaluate`'s for that patient at the same operating point.
Everything else is predicted slice by slice. A slice whose channels are all equal is predicted with a warning (stderr
and the `warning` column); an image with only two values (0 and one other) is refused as a mask.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from flaxtumor.data.io import IMAGE_SUFFIXES, DataError, is_mask_name, natural_key, read_image, read_mask
from flaxtumor.predict_nifti import NiftiInput, duplicate_names, group_cases, is_nifti
from flaxtumor.predict_nifti import is_own_output as is_own_nifti_output
from flaxtumor.runtime import enable_compilation_cache, process_seconds
from flaxtumor.truth import (PATIENTS_HEADER, TRUTH_COLUMNS, PatientScore, pair_masks_leniently, patients_table,
                             truth_cells)

# image: the resolved input path; tumour_probability: the classifier's P(tumour); has_tumour: 1 exactly when a mask is
# drawn (tumour_pixels > 0); tumour_pixels: the mask's pixel count; verdict: tumour / suspicious / no tumour;
# classifier_call: 1 when the classifier flags the slice (`OperatingPoint.flags`: at its flag threshold); patient: the
# volume the slice was predicted in (empty for a loose slice; a NIfTI case's name); warning: why the result may be
# unreliable (empty when none). A NIfTI slice's image is `<reference volume's path>#z=<k>`, k from 0 at the most
# inferior axial slice.
CSV_HEADER = ("image", "tumour_probability", "has_tumour", "tumour_pixels", "verdict", "classifier_call", "patient",
              "warning")
OWN_OUTPUTS = ("_pred.png", "_gradcam.png")
KAGGLE_PATIENT = re.compile(r"(TCGA_[A-Za-z0-9]{2}_[A-Za-z0-9]{4}_\d{8})_(\d+)")


@dataclass
class Inputs:
    images: list[Path]  # image files in input order (folders in natural order)
    masks: dict[Path, Path]  # image -> its kaggle mask (ground truth)
    cases: list[NiftiInput]  # NIfTI cases
    problems: list[str]  # inputs that are missing or cannot be used, reported with the other failures

    @property
    def has_truth(self) -> bool:
        return bool(self.masks) or any(c.has_truth for c in self.cases)


def _wanted(path: Path, use_truth: bool) -> bool:
    """A file a folder search keeps: images (and their masks, as truth), NIfTI; never predict's own outputs."""
    if is_nifti(path):
        return not is_own_nifti_output(path)
    if path.suffix.lower() not in IMAGE_SUFFIXES or path.name.endswith(OWN_OUTPUTS):
        return False  # <stem>_pred.png, <stem>_gradcam.png: pointing predict at its --out folder is safe
    return use_truth or not is_mask_name(path)


def collect_inputs(inputs: Sequence[str | Path], use_truth: bool = True, exclude: Path | None = None) -> Inputs:
    """The images, their masks and the NIfTI cases among `inputs`. Folders are searched recursively (natural order);
    a path that does not exist, or a mask without its image, is a problem reported with the other failures.
    `exclude`: a file never taken as an input (`--truth`)."""
    images: list[Path] = []
    masks: list[Path] = []
    volumes: list[Path] = []
    problems: list[str] = []
    seen: set[Path] = {exclude.resolve()} if exclude is not None else set()
    explicit: set[Path] = set()
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = sorted((p for p in path.rglob("*") if p.is_file() and _wanted(p, use_truth)),
                           key=lambda p: natural_key(str(p)))
        elif path.exists():
            if is_mask_name(path) and not use_truth:
                print(f"skipping {path}: files named *_mask.* are never inputs (--no-truth)", file=sys.stderr)
                continue
            found = [path]
            explicit.add(path.resolve())
        else:
            problems.append(f"{path}: no such file or folder")
            continue
        for p in found:
            if p.resolve() not in seen:  # the same file named twice is one input, not a duplicate stem
                seen.add(p.resolve())
                (volumes if is_nifti(p) else masks if is_mask_name(p) else images).append(p)
    images, pairs, unpaired = pair_masks_leniently(images + masks)
    cases, case_problems = group_cases(volumes, explicit, use_truth)
    return Inputs(images, pairs, cases, problems + [str(e) for e in unpaired] + case_problems)


def duplicate_stems(files: Sequence[Path]) -> list[str]:
    """One message per stem shared by several inputs (their masks would overwrite each other)."""
    by_stem: dict[str, list[Path]] = {}
    for p in files:
        by_stem.setdefault(p.stem, []).append(p)
    return [f"{stem}: {', '.join(str(p) for p in ps)}" for stem, ps in by_stem.items() if len(ps) > 1]


@dataclass(frozen=True)
class Group:
    files: tuple[Path, ...]
    volume: bool  # one patient's slices, in slice order
    patient: str = ""  # the volume's patient: its kaggle-style prefix or folder name


def _slice_number(path: Path) -> int | None:
    m = re.fullmatch(re.escape(path.parent.name) + r"_(\d+)", path.stem)
    return int(m.group(1)) if m else None


def group_volumes(files: Sequence[Path], batch_size: int) -> list[Group]:
    """Patient volumes (folders whose every input is `<folder>_<n>`; else, within a folder, the slices that share a
    kaggle-style patient prefix), each its own group, and batches of the remaining loose slices."""
    by_folder: dict[Path, list[Path]] = {}
    for p in files:
        by_folder.setdefault(p.parent, []).append(p)
    groups: list[Group] = []
    loose: list[Path] = []
    for folder, folder_files in by_folder.items():
        numbers = [_slice_number(p) for p in folder_files]
        if len(folder_files) > 1 and None not in numbers:
            groups.append(Group(tuple(p for _, p in sorted(zip(numbers, folder_files))), True, folder.name))
            continue
        by_patient: dict[str, list[tuple[int, Path]]] = {}
        for p in folder_files:
            m = KAGGLE_PATIENT.fullmatch(p.stem)
            if m:
                by_patient.setdefault(m.group(1), []).append((int(m.group(2)), p))
            else:
                loose.append(p)
        for patient, numbered in by_patient.items():
            if len(numbered) > 1:
                groups.append(Group(tuple(p for _, p in sorted(numbered)), True, patient))
            else:
                loose.append(numbered[0][1])
    groups += [Group(tuple(loose[i : i + batch_size]), volume=False) for i in range(0, len(loose), batch_size)]
    return groups


def write_heatmap(heat: np.ndarray, path: Path) -> None:
    """A [0, 1] map as 8-bit grayscale PNG (0 = no evidence, 255 = the slice's strongest)."""
    Image.fromarray(np.round(np.clip(heat, 0.0, 1.0) * 255).astype(np.uint8), mode="L").save(path)


def write_mask(mask: np.ndarray, path: Path) -> None:
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m flaxtumor.predict",
        description="Tumour probability and mask for MRI slices (research use only, not a medical device).",
    )
    ap.add_argument("inputs", nargs="+", metavar="INPUT",
                    help="image files, NIfTI volumes and/or folders (searched recursively); *_mask.* files are the "
                         "ground truth of their images")
    ap.add_argument("--out", required=True, type=Path,
                    help="output folder for <stem>_pred.png, <case>_pred.nii.gz, predictions.csv (and patients.csv)")
    ap.add_argument("--checkpoints", default="checkpoints", type=Path, help="folder with classifier/ and segmenter/")
    ap.add_argument("--threshold", type=float, default=None, help="tumour-probability gate (default: checkpoint's)")
    ap.add_argument("--no-gate", action="store_true", help="run the segmenter on every slice")
    ap.add_argument("--lcc", action=argparse.BooleanOptionalAction, default=None,
                    help="keep the largest 3D component in patient volumes (folders, NIfTI cases) (default: "
                         "checkpoints' pipeline.json)")
    ap.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                    help="average with a horizontal flip (default: checkpoints' pipeline.json)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--gradcam", type=Path, default=None, metavar="DIR",
                    help="also write DIR/<stem>_gradcam.png (DIR/<case>_z<k>_gradcam.png per NIfTI slice): the "
                         "classifier's Grad-CAM, 8-bit grayscale at the input's size, brighter = more evidence for "
                         "tumour")
    truth = ap.add_mutually_exclusive_group()
    truth.add_argument("--truth", type=Path, default=None, metavar="SEG",
                       help="a binary NIfTI segmentation: the ground truth of the one NIfTI case given (kaggle "
                            "*_mask.* files and NIfTI *_seg*/*_mask* beside the volumes are paired without it); adds "
                            "true_pixels and dice to predictions.csv and writes patients.csv")
    truth.add_argument("--no-truth", action="store_true",
                       help="ignore ground truth: masks and segmentations are neither read nor scored")
    ap.add_argument("--verbose", action="store_true",
                    help="print one line with where the time went: import, restore, compile, compute, write")
    return ap


class Timer:
    """Wall-clock seconds per stage since the process started; `line()` is --verbose's breakdown."""

    def __init__(self) -> None:
        self.stages: dict[str, float] = {"import": process_seconds()}
        self._mark = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.stages[stage] = self.stages.get(stage, 0.0) + now - self._mark
        self._mark = now

    def line(self, slices: int) -> str:
        parts = ", ".join(f"{k} {v:.2f} s" for k, v in self.stages.items())
        return f"time: {sum(self.stages.values()):.2f} s for {slices} slice(s) from process start ({parts})"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        print(f"error: --threshold must lie in [0, 1], got {args.threshold}", file=sys.stderr)
        return 2
    inputs = collect_inputs(args.inputs, use_truth=not args.no_truth, exclude=args.truth)
    failures = inputs.problems
    if problem := _usage_problem(inputs, args.truth):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.truth is not None:
        inputs.cases[0] = replace(inputs.cases[0], truth=args.truth)
    if not inputs.images and not inputs.cases:
        print("error: no input images found" + "".join(f"\n  {f}" for f in failures), file=sys.stderr)
        return 2

    pipeline, timer = _load_pipeline(args)
    if pipeline is None:
        return 2
    from flaxtumor.inference import ContextWarning

    warnings.filterwarnings("ignore", category=ContextWarning)  # each row's warning (and stderr) says it per slice
    outcome = _predict_all(pipeline, inputs, failures, args, timer)
    _write_tables(outcome, inputs, args.out)
    timer.lap("write")

    volumes = f", {outcome.volumes} NIfTI mask volume(s)" if inputs.cases else ""
    print(f"wrote {len(outcome.rows)} mask(s){volumes} and predictions.csv to {args.out}", file=sys.stderr)
    if args.verbose:
        print(timer.line(len(outcome.rows) + len(outcome.case_rows)), file=sys.stderr)
    if failures:
        print(f"{len(failures)} input(s) failed:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


def _usage_problem(inputs: Inputs, truth: Path | None) -> str | None:
    """Why the run cannot start (exit 2) before any model loads, or None."""
    dups = duplicate_stems(inputs.images)
    if dups:
        return "inputs share a stem, so their <stem>_pred.png would collide:\n  " + "\n  ".join(dups)
    dups = duplicate_names(inputs.cases)
    if dups:
        return "NIfTI cases share a name, so their <case>_pred.nii.gz would collide:\n  " + "\n  ".join(dups)
    if truth is not None and len(inputs.cases) != 1:
        return (f"--truth {truth}: the ground truth of one NIfTI case, but the inputs hold {len(inputs.cases)} "
                "(kaggle *_mask.* files are paired with their slices without --truth)")
    return None


def _write_tables(outcome: Outcome, inputs: Inputs, out: Path) -> None:
    """predictions.csv; with ground truth, its two truth columns, patients.csv and the table on stderr."""
    header = CSV_HEADER + (TRUTH_COLUMNS if inputs.has_truth else ())
    rows = [outcome.rows[p] for p in inputs.images if p in outcome.rows] + outcome.case_rows
    with open(out / "predictions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(r[: len(header)] for r in rows)
    if not inputs.has_truth:
        return
    with open(out / "patients.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(PATIENTS_HEADER)
        writer.writerows(s.row() for s in outcome.scores)
    if outcome.scores:
        print(patients_table(outcome.scores), file=sys.stderr)


def _load_pipeline(args: argparse.Namespace):
    """(pipeline compiled at its fixed shapes, timer), or (None, timer) after printing a one-line error."""
    enable_compilation_cache()  # before anything compiles: a warm cache skips compilation entirely
    from flaxtumor.inference import Pipeline  # jax loads only once the inputs are known to be usable

    timer = Timer()
    try:
        pipeline = Pipeline.from_checkpoints(
            args.checkpoints, threshold=args.threshold, gate=False if args.no_gate else None, tta=args.tta, lcc=args.lcc,
            batch_size=args.batch_size,
        )
    except ValueError as e:  # CheckpointError is a ValueError: one clear line
        print(f"error: {e}", file=sys.stderr)
        return None, timer
    timer.lap("restore")
    pipeline.warm_up()
    timer.lap("compile")
    return pipeline, timer


@dataclass
class Outcome:
    rows: dict[Path, tuple] = field(default_factory=dict)  # image inputs' CSV rows (with the truth cells) by path
    case_rows: list[tuple] = field(default_factory=list)  # NIfTI slices' rows, case after case
    scores: list[PatientScore] = field(default_factory=list)  # patient volumes with every slice's truth
    volumes: int = 0  # NIfTI mask volumes written


def _row(image: str, pred, patient: str, warning: str, truth: np.ndarray | None) -> tuple:
    return (image, f"{pred.tumour_probability:.6f}", int(pred.has_tumour), int(np.count_nonzero(pred.mask)),
            pred.verdict, int(pred.classifier_call), patient, warning, *truth_cells(pred.mask, truth))


def _predict_all(pipeline, inputs: Inputs, failures: list[str], args: argparse.Namespace, timer: Timer) -> Outcome:
    """Reads, predicts and writes every image group, then every NIfTI case (unreadable inputs go to `failures`).
    Reading and writing count as "write", the models and post-processing as "compute"."""
    from tqdm import tqdm

    args.out.mkdir(parents=True, exist_ok=True)
    if args.gradcam is not None:
        args.gradcam.mkdir(parents=True, exist_ok=True)
    outcome = Outcome()
    with tqdm(total=len(inputs.images), unit="slice", desc="predict", disable=None) as bar:
        for group in group_volumes(inputs.images, args.batch_size):
            _predict_group(pipeline, group, inputs.masks, failures, args, timer, outcome)
            bar.update(len(group.files))
        if inputs.cases:
            from flaxtumor.predict_nifti import OUT_OF_DOMAIN

            print(f"warning: {OUT_OF_DOMAIN}", file=sys.stderr)
        for item in inputs.cases:
            _predict_case(pipeline, item, failures, args, timer, outcome, bar)
    return outcome


def _read_group(group: Group, masks: dict[Path, Path], failures: list[str]) -> tuple[list, list, list]:
    """(images, their paths, their truths or None) for the group's readable slices; problems go to `failures`."""
    from flaxtumor.inference import MASK_REFUSAL, looks_like_mask

    images, readable, truths = [], [], []
    for path in group.files:
        try:
            image = read_image(path)
            if looks_like_mask(image):
                raise DataError(path, MASK_REFUSAL)
        except DataError as e:
            failures.append(str(e))
            continue
        images.append(image)
        readable.append(path)
        truths.append(_read_truth(masks.get(path), image.shape[:2], failures))
    return images, readable, truths


def _read_truth(mask_path: Path | None, shape: tuple[int, ...], failures: list[str]) -> np.ndarray | None:
    """The slice's mask, or None without one; a bad mask is a failure (its slice is still predicted, unscored)."""
    if mask_path is None:
        return None
    try:
        truth = read_mask(mask_path)
        if truth.shape != tuple(shape):
            raise DataError(mask_path, f"mask is {truth.shape[0]}x{truth.shape[1]} but its image is "
                                       f"{shape[0]}x{shape[1]}")
    except DataError as e:
        failures.append(str(e))
        return None
    return truth


def _predict_group(pipeline, group: Group, masks: dict[Path, Path], failures: list[str], args: argparse.Namespace,
                   timer: Timer, outcome: Outcome) -> None:
    from flaxtumor.inference import slice_warnings

    images, readable, truths = _read_group(group, masks, failures)
    timer.lap("write")
    if not readable:
        return
    as_volume = group.volume and len({im.shape for im in images}) == 1
    preds = pipeline.predict_volume(images) if as_volume else pipeline.predict_slices(images)
    timer.lap("compute")
    notes = slice_warnings(images, pipeline.segmenter_spec, as_volume)
    for path, image, pred, truth, warning in zip(readable, images, preds, truths, notes):
        write_mask(pred.mask, args.out / f"{path.stem}_pred.png")
        if args.gradcam is not None:
            write_heatmap(pipeline.gradcam(image), args.gradcam / f"{path.stem}_gradcam.png")
        if warning:
            print(f"warning: {path}: {warning}", file=sys.stderr)
        outcome.rows[path] = _row(str(path.resolve()), pred, group.patient if group.volume else "", warning, truth)
    timer.lap("write")
    scored = sum(t is not None for t in truths)
    if not group.volume or not scored:
        return
    if as_volume and scored == len(group.files):  # every slice read and with its truth: evaluate's patient
        outcome.scores.append(PatientScore.of(group.patient, [p.mask for p in preds], truths))
    else:
        n = len(group.files)
        if not as_volume:
            why = "slices of different sizes"
        elif len(readable) < n:
            why = f"{n - len(readable)} of {n} slices unreadable"
        else:
            why = f"{scored} of {n} slices have a truth"
        print(f"note: {group.patient}: no per-patient Dice ({why}; it needs the whole volume's)", file=sys.stderr)


def _predict_case(pipeline, item: NiftiInput, failures: list[str], args: argparse.Namespace, timer: Timer,
                  outcome: Outcome, bar) -> None:
    """One NIfTI case as one volume: <case>_pred.nii.gz, a row per axial slice, its score when it has a truth."""
    from flaxtumor.data.preprocess import grey_background
    from flaxtumor.inference import GRAY_WARNING, background_warning, input_warning
    from flaxtumor.predict_nifti import read_case, slice_name, write_case_mask

    try:
        case, truth_problem = read_case(item)
    except DataError as e:
        failures.append(str(e))
        return
    if truth_problem:
        failures.append(truth_problem)
    bar.total += len(case.slices)
    bar.refresh()
    timer.lap("write")
    preds = pipeline.predict_volume(case.slices)
    timer.lap("compute")
    masks = [p.mask for p in preds]
    write_case_mask(case, masks, args.out)
    outcome.volumes += 1
    truths = list(case.truth) if case.truth is not None else [None] * len(masks)
    warned = 0
    for k, (image, pred, truth) in enumerate(zip(case.slices, preds, truths)):
        if args.gradcam is not None:
            write_heatmap(pipeline.gradcam(image), args.gradcam / f"{case.patient}_z{k}_gradcam.png")
        # an all-zero slice (outside the head) has equal channels but is no grayscale input; equal channels inside
        # the head mean one volume was given for several roles
        warning = (input_warning(image) or "") if image.any() else ""
        warned += bool(warning)
        outcome.case_rows.append(_row(slice_name(case, k), pred, case.patient, warning, truth))
    if warned:  # once per case, not once per slice
        print(f"warning: {case.reference}: {warned} slice(s): {GRAY_WARNING}", file=sys.stderr)
    if grey := background_warning(grey_background(case.slices)):
        print(f"warning: {case.reference}: {grey}", file=sys.stderr)
    if case.truth is not None:
        outcome.scores.append(PatientScore.of(case.patient, masks, truths))
    bar.update(len(case.slices))
    timer.lap("write")


def cli() -> None:
    """The command's entry point: `main()`, then exit without the interpreter's teardown (about 0.4 s of freeing JAX's
    buffers and modules) once every output file is closed and both streams are flushed."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    cli()

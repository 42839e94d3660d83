"""`python -m flaxtumor.predict INPUT [INPUT ...] --out DIR [--checkpoints DIR] [--threshold T] [--no-gate]`

Output contract (scripts depend on it):
- `DIR/<image stem>_pred.png` for every readable input: uint8 0/255, the same height and width as that input;
- with `--gradcam GDIR`, `GDIR/<image stem>_gradcam.png` too: the classifier's Grad-CAM, 8-bit grayscale, same size;
- `DIR/predictions.csv`, header `image,tumour_probability,has_tumour,tumour_pixels,verdict,classifier_call,patient,
  warning`: one row per written mask, in input order (see `CSV_HEADER` and the README for each column).

INPUTs are image files and/or folders searched recursively; files named `*_mask.*` are never inputs. Two inputs with
the same stem are refused before any work. An unreadable input is reported by name; the others are still written and
the exit status is 1, with the failures listed. Usage errors (duplicate stems, no inputs, bad checkpoints) exit 2.

Slices are grouped into patient volumes: a folder whose every slice is `<folder name>_<n>.<ext>`, and, in any folder,
the slices named with one kaggle-style patient prefix (`TCGA_XX_NNNN_YYYYMMDD_<n>`). Each volume is predicted on its own
with `Pipeline.predict_volume` (volume normalisation as in training, its own post-processing, e.g. `--lcc`).
Everything else is predicted slice by slice. A slice whose channels are all equal is predicted with a warning (stderr
and the `warning` column); an image with only two values (0 and one other) is refused as a mask.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from flaxtumor.data.io import IMAGE_SUFFIXES, DataError, is_mask_name, natural_key, read_image
from flaxtumor.runtime import enable_compilation_cache, process_seconds

# image: the resolved input path; tumour_probability: the classifier's P(tumour); has_tumour: 1 exactly when a mask is
# drawn (tumour_pixels > 0); tumour_pixels: the mask's pixel count; verdict: tumour / suspicious / no tumour;
# classifier_call: 1 when tumour_probability >= the threshold; patient: the volume the slice was predicted in (empty
# for a loose slice); warning: why the result may be unreliable (empty when none).
CSV_HEADER = ("image", "tumour_probability", "has_tumour", "tumour_pixels", "verdict", "classifier_call", "patient",
              "warning")
KAGGLE_PATIENT = re.compile(r"(TCGA_[A-Za-z0-9]{2}_[A-Za-z0-9]{4}_\d{8})_(\d+)")


def collect_inputs(inputs: Sequence[str | Path]) -> tuple[list[Path], list[str]]:
    """(image files in input order, problems). Folders are searched recursively (natural order); masks are skipped;
    a path that does not exist is a problem reported with the other failures."""
    files: list[Path] = []
    problems: list[str] = []
    seen: set[Path] = set()
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            images = (p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            # predict's own outputs (<stem>_pred.png, <stem>_gradcam.png) are never inputs: pointing it at its --out
            # folder is safe
            found = sorted((p for p in images if not is_mask_name(p) and not p.name.endswith(OWN_OUTPUTS)),
                           key=lambda p: natural_key(str(p)))
        elif path.exists():
            if is_mask_name(path):
                print(f"skipping {path}: files named *_mask.* are never inputs", file=sys.stderr)
                continue
            found = [path]
        else:
            problems.append(f"{path}: no such file or folder")
            continue
        for p in found:
            if p.resolve() not in seen:  # the same file named twice is one input, not a duplicate stem
                seen.add(p.resolve())
                files.append(p)
    return files, problems


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


OWN_OUTPUTS = ("_pred.png", "_gradcam.png")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m flaxtumor.predict",
        description="Tumour probability and mask for MRI slices (research use only, not a medical device).",
    )
    ap.add_argument("inputs", nargs="+", metavar="INPUT", help="image files and/or folders (searched recursively)")
    ap.add_argument("--out", required=True, type=Path, help="output folder for <stem>_pred.png and predictions.csv")
    ap.add_argument("--checkpoints", default="checkpoints", type=Path, help="folder with classifier/ and segmenter/")
    ap.add_argument("--threshold", type=float, default=None, help="tumour-probability gate (default: checkpoint's)")
    ap.add_argument("--no-gate", action="store_true", help="run the segmenter on every slice")
    ap.add_argument("--lcc", action=argparse.BooleanOptionalAction, default=None,
                    help="keep the largest 3D component in patient-folder volumes (default: checkpoints' pipeline.json)")
    ap.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                    help="average with a horizontal flip (default: checkpoints' pipeline.json)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--gradcam", type=Path, default=None, metavar="DIR",
                    help="also write DIR/<stem>_gradcam.png: the classifier's Grad-CAM, 8-bit grayscale at the input's "
                         "size, brighter = more evidence for tumour")
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
    files, failures = collect_inputs(args.inputs)
    dups = duplicate_stems(files)
    if dups:
        print("error: inputs share a stem, so their <stem>_pred.png would collide:\n  " + "\n  ".join(dups),
              file=sys.stderr)
        return 2
    if not files:
        print("error: no input images found" + "".join(f"\n  {f}" for f in failures), file=sys.stderr)
        return 2

    pipeline, timer = _load_pipeline(args)
    if pipeline is None:
        return 2
    rows = _predict_all(pipeline, files, failures, args, timer)

    with open(args.out / "predictions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_HEADER)
        writer.writerows(rows[p] for p in files if p in rows)
    timer.lap("write")

    print(f"wrote {len(rows)} mask(s) and predictions.csv to {args.out}", file=sys.stderr)
    if args.verbose:
        print(timer.line(len(rows)), file=sys.stderr)
    if failures:
        print(f"{len(failures)} input(s) failed:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


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


def _predict_all(pipeline, files: list[Path], failures: list[str], args: argparse.Namespace, timer: Timer) -> dict:
    """Reads, predicts and writes every group; returns the CSV rows by input path (unreadable inputs go to
    `failures`). Reading and writing count as "write", the models and post-processing as "compute"."""
    from tqdm import tqdm

    from flaxtumor.inference import MASK_REFUSAL, input_warning, looks_like_mask

    args.out.mkdir(parents=True, exist_ok=True)
    if args.gradcam is not None:
        args.gradcam.mkdir(parents=True, exist_ok=True)
    rows: dict[Path, tuple] = {}
    with tqdm(total=len(files), unit="slice", desc="predict", disable=None) as bar:
        for group in group_volumes(files, args.batch_size):
            images, readable = [], []
            for path in group.files:
                try:
                    image = read_image(path)
                    if looks_like_mask(image):
                        raise DataError(path, MASK_REFUSAL)
                    images.append(image)
                    readable.append(path)
                except DataError as e:
                    failures.append(str(e))
                    bar.update(1)
            timer.lap("write")
            if not readable:
                continue
            if group.volume and len({im.shape for im in images}) == 1:
                preds = pipeline.predict_volume(images)
            else:
                preds = pipeline.predict_slices(images)
            timer.lap("compute")
            for path, image, pred in zip(readable, images, preds):
                write_mask(pred.mask, args.out / f"{path.stem}_pred.png")
                if args.gradcam is not None:
                    write_heatmap(pipeline.gradcam(image), args.gradcam / f"{path.stem}_gradcam.png")
                warning = input_warning(image) or ""
                if warning:
                    print(f"warning: {path}: {warning}", file=sys.stderr)
                rows[path] = (
                    str(path.resolve()),
                    f"{pred.tumour_probability:.6f}",
                    int(pred.has_tumour),
                    int(np.count_nonzero(pred.mask)),
                    pred.verdict,
                    int(pred.classifier_call),
                    group.patient if group.volume else "",
                    warning,
                )
            bar.update(len(readable))
            timer.lap("write")
    return rows


if __name__ == "__main__":
    sys.exit(main())

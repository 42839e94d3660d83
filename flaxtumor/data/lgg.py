"""The LGG kaggle_3m dataset as records: discovery, patient-level splits, and the config-driven entry point.

Layout (Buda et al., TCGA-LGG): `kaggle_3m/TCGA_<inst>_<id>_<date>/TCGA_..._<n>.tif` with `..._<n>_mask.tif`, plus an
optional `data.csv` of clinical fields keyed by `TCGA_<inst>_<id>`. Everything after discovery speaks `Slice` records.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from flaxtumor.config import DataConfig
from flaxtumor.data.io import IMAGE_SUFFIXES, DataError, image_shape, read_mask
from flaxtumor.data.synthetic import GENERATOR_VERSION, write_synthetic_dataset

log = logging.getLogger(__name__)

DOWNLOAD_HINT = (
    "download the LGG MRI dataset from Kaggle (mateuszbuda/lgg-mri-segmentation), unpack it so that this folder holds "
    "kaggle_3m/ (or the TCGA_* patient folders), or run with `--data synthetic` for a smoke run without a download"
)
_PATIENT_DIR = re.compile(r"^TCGA_[A-Za-z0-9]+_[A-Za-z0-9]+_\d+$")
_SLICE_FILE = re.compile(r"^(?P<stem>.+)_(?P<n>\d+)(?P<mask>_mask)?(?P<ext>\.[A-Za-z]+)$")
_IO_THREADS = 4  # mask decoding is zlib-bound and releases the GIL; a few threads keep discovery at a few seconds


@dataclass(frozen=True)
class Slice:
    patient_id: str
    slice_index: int
    image_path: Path
    mask_path: Path | None
    has_tumour: bool


@dataclass(frozen=True)
class Patient:
    patient_id: str
    slices: tuple[Slice, ...]  # ordered by slice_index

    @property
    def tumour_share(self) -> float:
        return sum(s.has_tumour for s in self.slices) / max(len(self.slices), 1)


# -- discovery ------------------------------------------------------------------------------------------------------


def resolve_root(root: str | Path) -> Path:
    """The folder holding the patient folders: `root` itself or `root/kaggle_3m`."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(root, f"dataset folder not found; {DOWNLOAD_HINT}")
    return root / "kaggle_3m" if (root / "kaggle_3m").is_dir() else root


def _pair_files(folder: Path) -> list[tuple[int, Path, Path]]:
    """(n, image, mask) for one patient folder, ordered by the integer n (never as text: _10 after _9)."""
    images: dict[int, Path] = {}
    masks: dict[int, Path] = {}
    for path in folder.iterdir():
        m = _SLICE_FILE.match(path.name)
        if not path.is_file() or m is None or m["ext"].lower() not in IMAGE_SUFFIXES:
            continue  # .DS_Store, notes, thumbnails
        n = int(m["n"])
        bucket = masks if m["mask"] else images
        if n in bucket:
            raise DataError(path, f"second file for slice {n} (already have {bucket[n].name})")
        bucket[n] = path
    if orphans := sorted(masks.keys() - images.keys()):
        raise DataError(masks[orphans[0]], "mask has no image (expected an image file without the _mask suffix)")
    if orphans := sorted(images.keys() - masks.keys()):
        image = images[orphans[0]]
        raise DataError(image, f"image has no mask (expected {image.stem}_mask{image.suffix})")
    if not images:
        raise DataError(folder, "patient folder holds no slices (expected TCGA_..._<n>.tif with _<n>_mask.tif)")
    return [(n, images[n], masks[n]) for n in sorted(images)]


def _check_pair(pair: tuple[int, Path, Path]) -> bool:
    """Reads the mask (validating it is binary) and the image header; returns has_tumour."""
    _, image, mask_path = pair
    mask = read_mask(mask_path)
    shape = image_shape(image)
    if shape != mask.shape:
        h, w = mask.shape
        raise DataError(mask_path, f"mask is {h}x{w} but its image {image.name} is {shape[0]}x{shape[1]}")
    return bool(mask.any())


def read_clinical_table(root: str | Path) -> pd.DataFrame | None:
    """`data.csv` (comma- or semicolon-separated) with a `patient_id` column naming the matching folder, or None.

    Rows for patients without a folder are kept with `patient_id` = NaN (a CSV may cover more patients than a copy).
    """
    folder = resolve_root(root)
    path = folder / "data.csv"
    if not path.is_file():
        return None
    try:
        with path.open(encoding="utf-8-sig") as f:
            header = f.readline()
        table = pd.read_csv(path, sep=";" if header.count(";") > header.count(",") else ",", encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise DataError(path, f"cannot parse ({type(e).__name__}: {e})") from None
    if "Patient" not in table.columns:
        raise DataError(path, f"no 'Patient' column (columns: {', '.join(map(str, table.columns[:8]))})")
    folders = {d.name.rsplit("_", 1)[0]: d.name for d in folder.iterdir() if _PATIENT_DIR.match(d.name)}
    table["patient_id"] = table["Patient"].astype(str).str.strip().map(folders)
    return table


def discover(root: str | Path) -> list[Patient]:
    """All patients under `root` (or `root/kaggle_3m`), sorted by patient_id; raises DataError naming a bad file."""
    folder = resolve_root(root)
    dirs = sorted(d for d in folder.iterdir() if d.is_dir() and _PATIENT_DIR.match(d.name))
    if not dirs:
        raise DataError(folder, f"no patient folders (TCGA_<inst>_<id>_<date>/) found; {DOWNLOAD_HINT}")
    pairs = {d.name: _pair_files(d) for d in dirs}
    flat = [p for ps in pairs.values() for p in ps]
    with ThreadPoolExecutor(_IO_THREADS) as pool:
        tumour = dict(zip((p[1] for p in flat), pool.map(_check_pair, flat)))
    patients = [
        Patient(pid, tuple(Slice(pid, n, image, mask, tumour[image]) for n, image, mask in ps))
        for pid, ps in pairs.items()
    ]
    table = read_clinical_table(folder)
    if table is not None:
        unlisted = sorted(set(pairs) - set(table["patient_id"].dropna()))
        without_folder = int(table["patient_id"].isna().sum())
        if without_folder or unlisted:  # only a mismatch is news (a partial copy of kaggle_3m, an edited CSV)
            log.info("%s: %d patients listed without a folder; %d folders not listed %s", folder / "data.csv",
                     without_folder, len(unlisted), unlisted[:5])
    return patients


# -- splits ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """Patient ids per split. Construction fails if any patient is in two splits (or twice in one)."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    seed: int

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for name in ("train", "val", "test"):
            for pid in getattr(self, name):
                if pid in seen:
                    raise ValueError(f"patient {pid} is in both {seen[pid]} and {name}: splits must be disjoint")
                seen[pid] = name

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "train": list(self.train), "val": list(self.val), "test": list(self.test)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Split":
        return cls(*(tuple(str(p) for p in d[k]) for k in ("train", "val", "test")), seed=int(d.get("seed", -1)))


def _stratified_pick(patients: Sequence[Patient], n_pick: int, rng: np.random.Generator) -> set[str]:
    """One random patient from each of n_pick strata of tumour-slice share, so the pick spans the distribution."""
    if n_pick == 0:
        return set()
    shuffled = [patients[i] for i in rng.permutation(len(patients))]  # random order among equal shares
    ordered = sorted(shuffled, key=lambda p: p.tumour_share)
    strata = np.array_split(np.arange(len(ordered)), n_pick)
    return {ordered[stratum[rng.integers(len(stratum))]].patient_id for stratum in strata}


def _count(n: int, fraction: float) -> int:
    """round(n * fraction), but at least one patient for a positive fraction and at least one left over."""
    if fraction <= 0:
        return 0
    return min(max(1, round(n * fraction)), n - 1)


def _check_tumours(split: Split, patients: Sequence[Patient]) -> Split:
    by_id = {p.patient_id: p for p in patients}
    for name in ("train", "val", "test"):
        ids = getattr(split, name)
        if ids and not any(s.has_tumour for pid in ids for s in by_id[pid].slices):
            raise ValueError(
                f"{name} split ({len(ids)} patients) holds no tumour slice; use more patients or another seed"
            )
    return split


def make_split(
    patients: Sequence[Patient], seed: int = 0, test_fraction: float = 0.15, val_fraction: float = 0.15
) -> Split:
    """Deterministic patient-level split: test first, then val carved out of the rest, both stratified by tumour
    share (the fraction of a patient's slices with tumour)."""
    if not 0 <= test_fraction < 1 or not 0 <= val_fraction < 1:
        raise ValueError(f"fractions must be in [0, 1): test={test_fraction}, val={val_fraction}")
    patients = sorted(patients, key=lambda p: p.patient_id)
    rng = np.random.default_rng(seed)
    test = _stratified_pick(patients, _count(len(patients), test_fraction), rng)
    rest = [p for p in patients if p.patient_id not in test]
    val = _stratified_pick(rest, _count(len(rest), val_fraction), rng)
    train = [p.patient_id for p in rest if p.patient_id not in val]
    return _check_tumours(Split(tuple(train), tuple(sorted(val)), tuple(sorted(test)), seed), patients)


def kfold_splits(patients: Sequence[Patient], k: int = 5, seed: int = 0, val_fraction: float = 0.15) -> list[Split]:
    """k patient-level folds, each the test set once; folds are stratified by tumour share, val carved from the rest."""
    patients = sorted(patients, key=lambda p: p.patient_id)
    if not 2 <= k <= len(patients):
        raise ValueError(f"k must be in [2, {len(patients)}] for {len(patients)} patients, got {k}")
    rng = np.random.default_rng(seed)
    shuffled = [patients[i] for i in rng.permutation(len(patients))]
    ordered = sorted(shuffled, key=lambda p: p.tumour_share)
    # Deal each run of k similar patients across the k folds in random order.
    fold_of = {}
    for start in range(0, len(ordered), k):
        for p, f in zip(ordered[start : start + k], rng.permutation(k)):
            fold_of[p.patient_id] = int(f)
    splits = []
    for f in range(k):
        test = {pid for pid, g in fold_of.items() if g == f}
        rest = [p for p in patients if p.patient_id not in test]
        val = _stratified_pick(rest, _count(len(rest), val_fraction), np.random.default_rng([seed, f]))
        train = [p.patient_id for p in rest if p.patient_id not in val]
        splits.append(_check_tumours(Split(tuple(train), tuple(sorted(val)), tuple(sorted(test)), seed), patients))
    return splits


def save_split(split: Split, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(split.to_dict(), indent=2) + "\n")


def load_split(path: str | Path) -> Split:
    """Reads a split JSON; a hand-edited file with a patient in two splits raises DataError."""
    path = Path(path)
    try:
        return Split.from_dict(json.loads(path.read_text()))
    except OSError as e:
        raise DataError(path, f"cannot read split file ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise DataError(path, f"not valid JSON ({e})") from None
    except (KeyError, TypeError, AttributeError) as e:
        expected = "{'train': [...], 'val': [...], 'test': [...], 'seed': int}"
        raise DataError(path, f"expected {expected} ({e!r})") from None
    except ValueError as e:
        raise DataError(path, str(e)) from None


def select(patients: Iterable[Patient], ids: Iterable[str]) -> list[Patient]:
    """The patients named by `ids`, in the order of `patients`; unknown ids raise."""
    wanted = set(ids)
    chosen = [p for p in patients if p.patient_id in wanted]
    missing = wanted - {p.patient_id for p in chosen}
    if missing:
        raise ValueError(f"{len(missing)} patient id(s) not in the dataset: {sorted(missing)[:5]}")
    return chosen


# -- config entry points --------------------------------------------------------------------------------------------


def synthetic_cache_dir(cfg: DataConfig) -> Path:
    """Keyed by every generator parameter, so a changed config never reuses a stale set."""
    base = Path(os.environ.get("FLAXTUMOR_CACHE", Path.home() / ".cache" / "flaxtumor"))
    name = f"synthetic-{cfg.synthetic_seed}-{cfg.synthetic_patients}x{cfg.synthetic_slices}-256-v{GENERATOR_VERSION}"
    return base / name


def load_dataset(cfg: DataConfig) -> list[Patient]:
    """Patients from cfg.root, or from a cached synthetic set when cfg.root == "synthetic"."""
    if cfg.root != "synthetic":
        return discover(cfg.root)
    root = synthetic_cache_dir(cfg)
    if not root.is_dir():
        # Written to a temporary sibling and renamed, so a crash or a concurrent run never leaves half a dataset.
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
        try:
            write_synthetic_dataset(tmp, cfg.synthetic_patients, cfg.synthetic_slices, 256, cfg.synthetic_seed)
            tmp.rename(root)
        except OSError:
            if not root.is_dir():  # another process won the race otherwise
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return discover(root)


def patient_split(cfg: DataConfig, patients: Sequence[Patient]) -> Split:
    """cfg.split_file when set (every id must exist in `patients`), else make_split from the cfg fractions and seed."""
    if not cfg.split_file:
        return make_split(patients, cfg.split_seed, cfg.test_fraction, cfg.val_fraction)
    split = load_split(cfg.split_file)
    known = {p.patient_id for p in patients}
    missing = sorted(pid for pid in split.train + split.val + split.test if pid not in known)
    if missing:
        raise DataError(cfg.split_file, f"{len(missing)} patient id(s) not in the dataset: {missing[:5]}")
    return split

"""NIfTI cases for `predict`: which of the input files form one patient's case, and reading and writing a case.

nibabel (through `flaxtumor.data.nifti`) is imported only when a NIfTI input exists, so TIF-only runs never pay for it.

Grouping, per folder: each NIfTI file named for no role is a case of its own (a 4-D volume; in a searched folder a
3-D one is skipped with a note, given by name it is an error), with any truth named like it (`case9.nii.gz` +
`case9_seg.nii.gz`). The files named for a role form one case, unless a role occurs twice and the names split into
patients (`p1_t1`, `p1_flair`, ..., `p2_t1`, ...; see `nifti.case_key`). A case is named after the patient its file
names share (their name without the role tokens), else their common stem, else its folder.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from flaxtumor.data.io import DataError, natural_key

if TYPE_CHECKING:
    from flaxtumor.data.nifti import NiftiCase

NIFTI_SUFFIXES = (".nii.gz", ".nii")  # flaxtumor.data.nifti's, repeated here so finding them needs no nibabel
OWN_OUTPUTS = ("_pred.nii.gz", "_pred.nii")  # <case>_pred.nii.gz (whose `pred` token would read as pre-contrast)
OUT_OF_DOMAIN = ("NIfTI input: the models were trained on kaggle_3m composites only (TCGA-LGG scanners and "
                 "protocols); volumes from other scanners or protocols, BraTS included, are out of domain: validate "
                 "before trusting the masks")


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def is_own_output(path: str | Path) -> bool:
    return str(path).lower().endswith(OWN_OUTPUTS)


@dataclass(frozen=True)
class NiftiInput:
    """One case to predict: its files (role volumes or one 4-D volume, and any truth named for it)."""

    name: str  # the patient: <name>_pred.nii.gz and the CSV's patient column
    files: tuple[Path, ...]
    truth: Path | None = None  # --truth, overriding a truth found by name

    @property
    def has_truth(self) -> bool:
        from flaxtumor.data.nifti import TRUTH, role_of

        return self.truth is not None or any(role_of(p) == TRUTH for p in self.files)


def _nifti():
    """flaxtumor.data.nifti, imported on first use (nibabel is a dependency; say so if it is missing anyway)."""
    try:
        from flaxtumor.data import nifti
    except ImportError as e:
        raise DataError(Path("."), f"reading NIfTI needs nibabel ({e}); pip install nibabel") from None
    return nifti


def group_cases(files: Sequence[Path], explicit: set[Path], use_truth: bool = True
                ) -> tuple[list[NiftiInput], list[str]]:
    """(cases in folder order, problems) for the NIfTI `files` (see the module docstring); `explicit`: the files named
    on the command line (resolved). Without `use_truth`, truth files are left out (never read)."""
    if not files:
        return [], []
    nifti = _nifti()
    by_folder: dict[Path, list[Path]] = {}
    for p in files:
        if use_truth or nifti.role_of(p) != nifti.TRUTH:
            by_folder.setdefault(p.parent, []).append(p)
    cases: list[NiftiInput] = []
    problems: list[str] = []
    for folder, folder_files in by_folder.items():
        unnamed = [p for p in folder_files if nifti.role_of(p) is None]
        named = [p for p in folder_files if p not in unnamed]
        for volume in unnamed:
            if volume.resolve() not in explicit and _is_3d(volume):
                print(f"skipping {volume}: a 3-D NIfTI named for no role (a single volume must be 4-D, (X, Y, Z, 3))",
                      file=sys.stderr)
                continue
            key = nifti.nifti_stem(volume).lower()
            own = [p for p in named if nifti.role_of(p) == nifti.TRUTH and nifti.case_key(p).lower() == key]
            named = [p for p in named if p not in own]
            cases.append(NiftiInput(nifti.nifti_stem(volume), (volume, *own)))
        for group in _split_patients(named, nifti):
            roles = {nifti.role_of(p) for p in group}
            if roles <= {nifti.SKIPPED}:
                continue  # T2 only: recognised, not used
            if roles <= {nifti.TRUTH, nifti.SKIPPED}:
                problems += [f"{p}: truth segmentation without its volumes (expected the pre-contrast, FLAIR and "
                             "post-contrast volumes, or a 4-D volume named like it, beside it)"
                             for p in group if nifti.role_of(p) == nifti.TRUTH]
                continue
            cases.append(NiftiInput(_case_name(group, folder, nifti), tuple(group)))
    return cases, problems


def _split_patients(named: list[Path], nifti) -> list[list[Path]]:
    """The role files of one folder as one case, or one case per patient when a role occurs twice and the names split
    cleanly (every patient's key non-empty, no role twice within one); otherwise one case, whose duplicate role
    `load_case` then reports."""
    if not named:
        return []
    roles = [nifti.role_of(p) for p in named if nifti.role_of(p) != nifti.SKIPPED]
    if len(roles) == len(set(roles)):
        return [named]
    by_key: dict[str, list[Path]] = {}
    for p in named:
        by_key.setdefault(nifti.case_key(p).lower(), []).append(p)
    clean = all(key for key in by_key) and all(
        len(r) == len(set(r)) for r in ([nifti.role_of(p) for p in g if nifti.role_of(p) != nifti.SKIPPED]
                                        for g in by_key.values()))
    if not clean:
        return [named]
    return [by_key[k] for k in sorted(by_key, key=natural_key)]


def _case_name(group: list[Path], folder: Path, nifti) -> str:
    """The patient the files' names share (`BraTS2021_00042`), else their common stem, else the folder's name."""
    keys = {nifti.case_key(p) for p in group}
    if len({k.lower() for k in keys}) == 1 and next(iter(keys)):
        return next(iter(keys))
    return nifti.common_stem(group) or folder.name


def _is_3d(path: Path) -> bool:
    try:
        import nibabel as nib

        return len(nib.load(path).shape) == 3
    except Exception:  # unreadable: keep it, so load_case reports why
        return False


def duplicate_names(cases: Sequence[NiftiInput]) -> list[str]:
    """One message per case name shared by several cases (their <name>_pred.nii.gz would collide)."""
    by_name: dict[str, list[NiftiInput]] = {}
    for c in cases:
        by_name.setdefault(c.name, []).append(c)
    return [f"{name}: " + "; ".join(", ".join(str(p) for p in c.files) for c in cs)
            for name, cs in by_name.items() if len(cs) > 1]


def read_case(item: NiftiInput) -> tuple[NiftiCase, str | None]:
    """(the case's uint8 composites and truth, None), or a DataError naming the file and the problem. A bad truth
    loses only the truth: (the case without it, the truth's problem)."""
    nifti = _nifti()
    try:
        return nifti.load_case(list(item.files), truth=item.truth, patient=item.name), None
    except DataError as e:
        truths = {p for p in item.files if nifti.role_of(p) == nifti.TRUTH} | ({item.truth} - {None})
        if e.path not in truths:
            raise
        volumes = [p for p in item.files if p not in truths]
        return nifti.load_case(volumes, patient=item.name), f"{e} (its case is predicted without a truth)"


def slice_name(case: NiftiCase, k: int) -> str:
    """The CSV's image for slice k: the reference volume's path and the axial index in the sliced frame (0 is the most
    inferior slice, as nifti.load_case orders them)."""
    return f"{case.reference.resolve()}#z={k}"


def write_case_mask(case: NiftiCase, masks: Sequence[np.ndarray], out: Path) -> Path:
    """The (D, H, W) predicted masks as `out/<case>_pred.nii.gz` on the input's grid, with its affine and header."""
    return case.write_mask(np.stack([np.asarray(m, bool) for m in masks]), out / f"{case.patient}_pred.nii.gz")

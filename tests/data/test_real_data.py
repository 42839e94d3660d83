"""A real kaggle_3m copy (skipped where absent; a failure under FLAXTUMOR_STRICT=1).

Every test checks invariants that hold for any copy of kaggle_3m: counts equal to what its folders and data.csv hold,
slice numbers 1..n, disjoint stratified splits that each hold tumour. They run on our shared 81-patient subset and on a
110-patient layout (the shared patients linked in, plus synthetic patients in kaggle naming), the size of the full
Kaggle download. The exact figures of our subset (81 patients, 2839 slices, 993 with tumour, a 59/10/12 split) are
asserted only when the copy holds exactly the patients listed in lgg_shared_patients.txt.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flaxtumor.data.lgg import Patient, Split, discover, kfold_splits, make_split, read_clinical_table
from flaxtumor.data.synthetic import write_synthetic_dataset

pytestmark = pytest.mark.realdata

MANIFEST = Path(__file__).with_name("lgg_shared_patients.txt")
SHARED = {"patients": 81, "slices": 2839, "tumour_slices": 993, "split": (59, 10, 12)}
FULL_SIZE = 110  # patients in the public Kaggle dataset
SYNTHETIC_SLICES = 8  # per added synthetic patient, small so the layout builds in seconds


def shared_manifest() -> set[str]:
    lines = (line.strip() for line in MANIFEST.read_text().splitlines())
    return {line for line in lines if line and not line.startswith("#")}


@dataclass(frozen=True)
class Copy:
    root: Path
    patients: list[Patient]
    added_synthetic: int  # synthetic patients linked in beside the real ones (0 for the copy itself)


def build_110_layout(real: Path, dest: Path) -> Path:
    """`dest/kaggle_3m`: symlinks to every real patient folder plus synthetic patients up to 110, with one data.csv
    listing them all (real rows first)."""
    out = dest / "kaggle_3m"
    out.mkdir(parents=True)
    real_dirs = sorted(d for d in real.iterdir() if d.is_dir() and d.name.startswith("TCGA_"))
    for d in real_dirs:
        (out / d.name).symlink_to(d.resolve(), target_is_directory=True)
    n_synthetic = max(FULL_SIZE - len(real_dirs), 3)  # a full 110-patient download still gets a few added
    synthetic = write_synthetic_dataset(dest / "synthetic", n_synthetic, SYNTHETIC_SLICES, size=64, seed=7)
    for d in sorted(p for p in synthetic.iterdir() if p.is_dir()):
        d.rename(out / d.name)
    tables = [pd.read_csv(p) for p in (real / "data.csv", synthetic / "data.csv") if p.is_file()]
    pd.concat(tables, ignore_index=True).to_csv(out / "data.csv", index=False)
    return out


@pytest.fixture(scope="module", params=["shared copy", "110-patient layout"])
def copy(request: pytest.FixtureRequest, lgg_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Copy:
    if request.param == "shared copy":
        return Copy(lgg_root, discover(lgg_root), 0)
    root = build_110_layout(lgg_root, tmp_path_factory.mktemp("lgg110"))
    real = {d.name for d in lgg_root.iterdir() if d.is_dir() and d.name.startswith("TCGA_")}
    return Copy(root, discover(root), len({d.name for d in root.iterdir() if d.is_dir()} - real))


def _files(root: Path, mask: bool) -> list[Path]:
    return [p for p in root.glob("TCGA_*/*.tif") if p.stem.endswith("_mask") == mask]


def test_counts_match_the_folders_and_data_csv(copy: Copy) -> None:
    patients, slices = copy.patients, [s for p in copy.patients for s in p.slices]
    folders = [d for d in copy.root.iterdir() if d.is_dir() and d.name.startswith("TCGA_")]
    assert len(patients) == len(folders) > 0
    # counted from the files themselves, independently of discovery
    assert len(slices) == len(_files(copy.root, mask=False)) == len(_files(copy.root, mask=True))
    assert 0 < sum(s.has_tumour for s in slices) < len(slices)
    assert all([s.slice_index for s in p.slices] == list(range(1, len(p.slices) + 1)) for p in patients)
    table = read_clinical_table(copy.root)
    assert table is not None and set(table["patient_id"].dropna()) == {p.patient_id for p in patients}


def test_exact_figures_only_for_our_shared_subset(copy: Copy) -> None:
    ids = {p.patient_id for p in copy.patients}
    slices = [s for p in copy.patients for s in p.slices]
    figures = {"patients": len(ids), "slices": len(slices), "tumour_slices": sum(s.has_tumour for s in slices),
               "split": tuple(len(part) for part in _parts(make_split(copy.patients, seed=0)))}
    if ids == shared_manifest():
        assert figures == SHARED
    elif copy.added_synthetic and ids > shared_manifest():
        # the shared subset plus synthetic patients up to 110: not mistaken for the subset, and its own counts
        assert figures["patients"] == FULL_SIZE and copy.added_synthetic == FULL_SIZE - SHARED["patients"]
        assert figures["slices"] == SHARED["slices"] + copy.added_synthetic * SYNTHETIC_SLICES
        assert figures["split"] != SHARED["split"]
    # any other copy (the full download, another subset): the invariants of the other tests only


def _parts(split: Split) -> tuple[tuple[str, ...], ...]:
    return split.train, split.val, split.test


def _assert_stratified(part: tuple[str, ...], pool: list[Patient]) -> None:
    """One patient per stratum of tumour share: the i-th smallest share of `part` lies within stratum i's range."""
    shares = sorted(p.tumour_share for p in pool)
    strata = np.array_split(np.array(shares), len(part))
    picked = sorted(p.tumour_share for p in pool if p.patient_id in part)
    for share, stratum in zip(picked, strata):
        assert stratum[0] <= share <= stratum[-1]


def test_splits_are_disjoint_stratified_and_hold_tumours(copy: Copy) -> None:
    patients = copy.patients
    by_id = {p.patient_id: p for p in patients}
    n = len(patients)
    split = make_split(patients, seed=0)
    n_test = round(n * 0.15)
    assert (len(split.test), len(split.val)) == (n_test, round((n - n_test) * 0.15))  # 85/15, val 15% of the rest
    _assert_stratified(split.test, patients)
    _assert_stratified(split.val, [p for p in patients if p.patient_id not in split.test])
    folds = kfold_splits(patients, k=5, seed=0)
    for s in [split, *folds]:
        ids = [pid for part in _parts(s) for pid in part]
        assert len(ids) == len(set(ids)) == n
        for part in _parts(s):
            assert any(sl.has_tumour for pid in part for sl in by_id[pid].slices)
    tests = [set(f.test) for f in folds]
    assert set().union(*tests) == set(by_id) and sum(map(len, tests)) == n  # each patient tested exactly once
    assert all(abs(len(t) - n / 5) < 1 for t in tests)

"""The app's examples: synthetic slices and a patient zip made by the project's own generator (real dataset images
cannot be redistributed), or a folder of the user's own."""

from __future__ import annotations

import shutil
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flaxtumor.app.state import private_root
from flaxtumor.data.io import IMAGE_SUFFIXES, is_mask_name, natural_key, read_mask


EXAMPLE_SEED = 7


@dataclass(frozen=True)
class Examples:
    slices: dict[str, Path]  # display name -> image file
    patients: list[Path]  # zips


def make_examples(dest: Path, seed: int = EXAMPLE_SEED) -> Path:
    """Writes a tumour slice, a tumour-free slice and a patient zip made by the project's synthetic generator."""
    from flaxtumor.data.synthetic import write_synthetic_dataset

    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="examples-", dir=private_root()) as tmp:
        (patient,) = [p for p in write_synthetic_dataset(tmp, n_patients=1, n_slices=24, seed=seed).iterdir() if p.is_dir()]
        slices = sorted((p for p in patient.glob("*.tif") if not is_mask_name(p)), key=lambda p: natural_key(p.name))
        areas = [int(read_mask(p.with_name(f"{p.stem}_mask.tif")).sum()) for p in slices]
        shutil.copyfile(slices[int(np.argmax(areas))], dest / "synthetic_tumour_slice.tif")
        clear = min((i for i, a in enumerate(areas) if a == 0), key=lambda i: abs(i - len(areas) // 2))
        shutil.copyfile(slices[clear], dest / "synthetic_clear_slice.tif")
        with zipfile.ZipFile(dest / "synthetic_patient.zip", "w", zipfile.ZIP_DEFLATED) as zf:
            for p in sorted(patient.iterdir()):
                zf.write(p, f"{patient.name}/{p.name}")
    return dest


_EXAMPLES_LOCK = threading.Lock()


def default_examples_dir() -> Path:
    """Generated fresh once per process inside the private root: a shared, predictable folder could be planted by
    another local user (and anything in it would be served)."""
    dest = private_root() / "examples"
    with _EXAMPLES_LOCK:
        if not (dest / "synthetic_patient.zip").is_file():
            shutil.rmtree(dest, ignore_errors=True)
            make_examples(dest)
    return dest


def find_examples(folder: Path) -> Examples:
    """Image files in `folder` are slice examples, `*.zip` files patient examples (masks `*_mask.*` are skipped)."""
    files = sorted((p for p in folder.iterdir() if p.is_file()), key=lambda p: natural_key(p.name))
    slices = {p.name: p for p in files if p.suffix.lower() in IMAGE_SUFFIXES and not is_mask_name(p)}
    return Examples(slices=slices, patients=[p for p in files if p.suffix.lower() == ".zip"])

"""A small LGG-like dataset in the exact kaggle_3m layout and format, for tests and smoke runs only.

Each patient is a volume: a textured head-like ellipse that shrinks towards the end slices, and a tumour that is bright
in FLAIR (channel 1, as in kaggle_3m's pre-contrast/FLAIR/post-contrast order) over a contiguous run of slices, with
an irregular outline and a size that varies between patients. Deterministic from the seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
from scipy import ndimage

GENERATOR_VERSION = 2  # bump when the written files change, so cached copies are regenerated (2: no phantom CSV row)
# Mean brain intensity per channel (pre-contrast, FLAIR, post-contrast) and the tumour's contrast to it.
_BRAIN = np.array([95.0, 105.0, 90.0])
_SKULL = np.array([150.0, 60.0, 140.0])
_TUMOUR = np.array([-12.0, 95.0, 18.0])


def _patient_id(i: int, seed: int) -> str:
    return f"TCGA_SY_{seed % 100:02d}{i:02d}_{1995 + i % 20}{i % 12 + 1:02d}{i % 28 + 1:02d}"


def _volume(n_slices: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (D, size, size, 3) images and bool (D, size, size) masks for one patient."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    centre = size / 2 + rng.uniform(-0.03, 0.03, 2) * size
    axes = rng.uniform([0.34, 0.28], [0.40, 0.34]) * size

    # Tissue texture: noise smooth within and across slices, so neighbouring slices look alike.
    texture = ndimage.gaussian_filter(rng.normal(size=(n_slices, size, size)), sigma=(1.0, 3.0, 3.0))
    texture /= texture.std() + 1e-9

    run = int(rng.integers(max(2, n_slices // 4), max(3, n_slices // 2) + 1))
    first = int(rng.integers(n_slices // 5, max(n_slices // 5 + 1, n_slices - run - n_slices // 10 + 1)))
    radius = rng.uniform(0.05, 0.13) * size
    spot = centre + rng.uniform(-0.45, 0.45, 2) * (axes - radius)
    harmonics = rng.uniform(-0.18, 0.18, (2, 4))  # outline wobble: cos/sin amplitudes of angular frequencies 2..5

    images = np.zeros((n_slices, size, size, 3), np.uint8)
    masks = np.zeros((n_slices, size, size), bool)
    for z in range(n_slices):
        t = (z - (n_slices - 1) / 2) / (n_slices / 2)
        shrink = np.sqrt(max(1.0 - (0.9 * t) ** 2, 0.1))
        r = np.hypot((yy - centre[0]) / (axes[0] * shrink), (xx - centre[1]) / (axes[1] * shrink))
        head, brain = r < 1.0, r < 0.9
        skull = head & ~brain
        img = np.zeros((size, size, 3))
        img[brain] = _BRAIN + 14.0 * texture[z][brain][:, None] + rng.normal(0, 4, (brain.sum(), 3))
        img[skull] = _SKULL + 10.0 * texture[z][skull][:, None]

        if first <= z < first + run:
            u = (z - first + 0.5) / run * 2 - 1  # -1..1 across the run: a spheroid's cross-sections
            rz = max(radius * np.sqrt(1 - u**2), 3.0)
            angle = np.arctan2(yy - spot[0], xx - spot[1])
            k = np.arange(2, 6)[:, None, None]
            cos, sin = harmonics[0][:, None, None], harmonics[1][:, None, None]
            wobble = 1 + (cos * np.cos(k * angle) + sin * np.sin(k * angle)).sum(0)
            dist = np.hypot(yy - spot[0], xx - spot[1])
            mask = (dist < rz * wobble) & brain
            # Oedema: FLAIR brightness fades out just beyond the segmented lesion, as in real FLAIR.
            halo = np.clip(1 - (dist - rz * wobble) / 4.0, 0, 1) * brain
            img += halo[..., None] * _TUMOUR * (0.9 + 0.2 * rng.random())
            masks[z] = mask
        images[z] = np.clip(img, 0, 255).astype(np.uint8)
    return images, masks


def write_synthetic_dataset(
    root: str | Path, n_patients: int = 6, n_slices: int = 20, size: int = 256, seed: int = 0
) -> Path:
    """Writes `root/kaggle_3m/<patient>/<patient>_<n>.tif` + `_<n>_mask.tif` (n from 1) and `data.csv`; returns the
    kaggle_3m folder. Every patient has tumour in some slices, so any patient-level split holds tumour slices."""
    if n_patients < 1 or n_slices < 4:
        raise ValueError(f"need at least 1 patient and 4 slices, got {n_patients} x {n_slices}")
    out = Path(root) / "kaggle_3m"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_patients):
        pid = _patient_id(i, seed)
        images, masks = _volume(n_slices, size, np.random.default_rng([seed, i]))
        folder = out / pid
        folder.mkdir(exist_ok=True)
        for n, (image, mask) in enumerate(zip(images, masks), start=1):
            tifffile.imwrite(folder / f"{pid}_{n}.tif", image, photometric="rgb", compression="zlib")
            tifffile.imwrite(folder / f"{pid}_{n}_mask.tif", mask.astype(np.uint8) * 255, compression="zlib")
        rows.append({"Patient": pid.rsplit("_", 1)[0], "gender": 1 + i % 2, "age_at_initial_pathologic": 30 + 3 * i})
    # One row per written patient: a row without a folder made every synthetic run log a phantom patient.
    pd.DataFrame(rows).to_csv(out / "data.csv", index=False)
    return out

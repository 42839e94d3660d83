"""The synthetic set looks like kaggle_3m: 256x256x3 uint8 TIFs, 0/255 masks, FLAIR-bright tumours in slice runs."""

from pathlib import Path

import numpy as np
import tifffile

from flaxtumor.data.io import read_image, read_mask
from flaxtumor.data.lgg import Patient


def test_format(synthetic_root: Path) -> None:
    image = tifffile.imread(next(synthetic_root.glob("*/*_1.tif")))
    mask = tifffile.imread(next(synthetic_root.glob("*/*_1_mask.tif")))
    assert image.shape == (256, 256, 3) and image.dtype == np.uint8
    assert mask.shape == (256, 256) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
    assert (synthetic_root / "data.csv").is_file()


def test_tumours_are_contiguous_and_flair_bright(synthetic_patients: list[Patient]) -> None:
    sizes = []
    for p in synthetic_patients:
        idx = [s.slice_index for s in p.slices if s.has_tumour]
        assert idx and idx == list(range(idx[0], idx[-1] + 1))  # one contiguous run
        s = max((s for s in p.slices if s.has_tumour), key=lambda s: read_mask(s.mask_path).sum())
        image, mask = read_image(s.image_path).astype(float), read_mask(s.mask_path)
        brain = image[..., 1] > 0
        assert image[mask, 1].mean() > image[brain & ~mask, 1].mean() + 50  # FLAIR (channel 1) hyperintense
        sizes.append(mask.sum())
    assert max(sizes) > 2 * min(sizes)  # tumour size varies between patients

"""Reading MRI slices and tumour masks from disk, with one clear error per bad file.

kaggle_3m ships 256x256 RGB TIFFs (pre-contrast, FLAIR, post-contrast) and 0/255 masks; users bring PNG/JPEG, uint16
and grayscale exports too, so everything is normalised here to uint8 (H, W, 3) images and bool (H, W) masks.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

import numpy as np
import tifffile
from PIL import Image

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")


def natural_key(name: str) -> list[int | str]:
    """`x_2.tif` sorts before `x_10.tif` (kaggle_3m numbers slices without zero padding); case-insensitive."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", str(name))]


def is_mask_name(name: str | Path) -> bool:
    """kaggle_3m keeps ground-truth masks beside the slices as `<slice>_mask.<ext>`: they are never inputs."""
    return PurePosixPath(str(name)).stem.lower().endswith("_mask")
_TIFF_SUFFIXES = (".tif", ".tiff")


class DataError(ValueError):
    """A bad input file or folder; the message starts with its path."""

    def __init__(self, path: str | Path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = Path(path), problem

    def __reduce__(self) -> tuple:
        return type(self), (self.path, self.problem)  # survives the trip back from a grain worker process


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise DataError(path, "file not found")
    if path.stat().st_size == 0:
        raise DataError(path, "zero-byte file")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise DataError(path, f"unsupported file type (expected one of {', '.join(IMAGE_SUFFIXES)})")


def _single_page(tif: tifffile.TiffFile, path: Path) -> tifffile.TiffPage:
    # A multi-page TIFF is a volume or a stack: taking page 0 would silently drop data.
    if len(tif.pages) != 1:
        raise DataError(path, f"multi-page TIFF ({len(tif.pages)} pages); expected one 2-D slice per file")
    return tif.pages[0]


def _read_array(path: Path) -> np.ndarray:
    """Decodes a single-page image as stored (any dtype, 2-D or 3-D)."""
    _check_file(path)
    try:
        if path.suffix.lower() in _TIFF_SUFFIXES:
            with tifffile.TiffFile(path) as tif:
                return _single_page(tif, path).asarray()
        with Image.open(path) as im:
            if getattr(im, "n_frames", 1) != 1:
                raise DataError(path, f"multi-frame image ({im.n_frames} frames); expected one 2-D slice per file")
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif im.mode in ("I;16", "I;16B", "I;16L"):
                return np.asarray(im).astype(np.uint16)
            return np.asarray(im)
    except DataError:
        raise
    except Exception as e:  # decoders raise anything from OSError to zlib.error on a damaged file
        raise DataError(path, f"unreadable or corrupt image ({type(e).__name__}: {e})") from None


def image_shape(path: str | Path) -> tuple[int, int]:
    """(H, W) from the file header only: discovery checks sizes without decoding every image."""
    path = Path(path)
    _check_file(path)
    try:
        if path.suffix.lower() in _TIFF_SUFFIXES:
            with tifffile.TiffFile(path) as tif:
                shape = _single_page(tif, path).shape
        else:
            with Image.open(path) as im:
                shape = (im.height, im.width)
    except DataError:
        raise
    except Exception as e:  # decoders raise anything from OSError to zlib.error on a damaged file
        raise DataError(path, f"unreadable or corrupt image ({type(e).__name__}: {e})") from None
    return int(shape[0]), int(shape[1])


def _to_uint8(a: np.ndarray, path: Path) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if a.dtype == np.uint16:
        # MRI exports rarely use the full 16-bit range: scale by the slice maximum, not by 65535, to keep contrast.
        peak = int(a.max())
        if peak == 0:
            return np.zeros(a.shape, np.uint8)
        return (a.astype(np.float32) * (255.0 / peak) + 0.5).astype(np.uint8)
    raise DataError(path, f"unsupported pixel type {a.dtype} (expected uint8 or uint16)")


def read_image(path: str | Path) -> np.ndarray:
    """An MRI slice as uint8 (H, W, 3): gray replicated to 3 channels, alpha dropped, uint16 rescaled."""
    path = Path(path)
    a = _read_array(path)
    if a.ndim == 3 and a.shape[-1] in (1, 2):  # gray, gray + alpha
        a = a[..., 0]
    if a.ndim == 2:
        a = np.repeat(_to_uint8(a, path)[..., None], 3, axis=-1)
    elif a.ndim == 3 and a.shape[-1] in (3, 4):
        a = _to_uint8(a[..., :3], path)
    else:
        raise DataError(path, f"unsupported image shape {a.shape} (expected HxW, HxWx3 or HxWx4)")
    return np.ascontiguousarray(a)


def read_mask(path: str | Path) -> np.ndarray:
    """A tumour mask as bool (H, W); anything but two levels (0 and the type's maximum) is rejected."""
    path = Path(path)
    a = _read_array(path)
    if a.ndim == 3:
        # Masks saved as RGB(A) are accepted when the colour channels agree.
        colours = a[..., :3]
        if a.shape[-1] not in (1, 3, 4) or not (colours == colours[..., :1]).all():
            raise DataError(path, f"mask has shape {a.shape} with differing channels; expected a single-channel mask")
        a = a[..., 0]
    if a.ndim != 2:
        raise DataError(path, f"unsupported mask shape {a.shape} (expected HxW)")
    if a.dtype == np.bool_:
        return a.copy()
    if a.dtype not in (np.uint8, np.uint16):
        raise DataError(path, f"unsupported mask pixel type {a.dtype} (expected uint8 or uint16)")
    top = np.iinfo(a.dtype).max
    if not ((a == 0) | (a == top)).all():  # cheaper than np.unique: discovery reads every mask
        values = np.unique(a)
        shown = ", ".join(str(v) for v in values[:6]) + (", ..." if len(values) > 6 else "")
        raise DataError(path, f"mask is not binary: values {{{shown}}}, expected only 0 and {top}")
    return a > top // 2

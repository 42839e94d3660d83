"""Reading MRI slices and tumour masks from disk, with one clear error per bad file.

kaggle_3m ships 256x256 RGB TIFFs (pre-contrast, FLAIR, post-contrast) and 0/255 masks; users bring PNG/JPEG, uint16
and grayscale exports too, so everything is normalised here to uint8 (H, W, 3) images and bool (H, W) masks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
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
CORRUPT = "unreadable or corrupt image"  # uploads map this decoder failure to words without its details


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


_PIL_MODES = {  # mode -> (samples per pixel as numpy sees them, dtype), for the modes read_image can convert
    "1": (1, np.bool_), "L": (1, np.uint8), "LA": (2, np.uint8), "P": (4, np.uint8), "PA": (4, np.uint8),
    "RGB": (3, np.uint8), "RGBA": (4, np.uint8), "RGBX": (4, np.uint8), "CMYK": (4, np.uint8),
    "YCbCr": (3, np.uint8), "I;16": (1, np.uint16), "I;16B": (1, np.uint16), "I;16L": (1, np.uint16),
    "I": (1, np.int32), "F": (1, np.float32),  # decodable, but refused by `ImageHeader.problem`
}
_SLICE_DTYPES = (np.bool_, np.uint8, np.uint16)
MAX_CHANNELS = 4  # gray, gray + alpha, RGB, RGBA: anything with more samples per pixel is not an MRI slice


@dataclass(frozen=True)
class ImageHeader:
    """What a file header says a decoder would allocate: the full page shape and the pixel type."""

    height: int
    width: int
    depth: int = 1  # volumetric TIFF (SGI ImageDepth)
    pages: int = 1
    channels: int = 1  # samples per pixel (palette images count as the RGBA they are converted to)
    dtype: np.dtype | None = np.dtype(np.uint8)  # None: a pixel type numpy cannot hold
    kind: str = "image"  # the format, for messages

    @property
    def nbytes(self) -> int:
        """Bytes of the array the decoder returns."""
        itemsize = 8 if self.dtype is None else self.dtype.itemsize
        return self.height * self.width * self.depth * self.pages * self.channels * itemsize

    def decode_bytes(self) -> int:
        """Estimated peak memory of `read_image` on this file: the decoded array, the float32 copy that rescales 16-bit
        data, and the uint8 (H, W, 3) result (with its intermediate)."""
        kept = 1 if self.channels <= 2 else 3
        rescale = 4 * kept if self.dtype is not None and self.dtype.itemsize > 1 else 0
        return self.nbytes + self.height * self.width * (rescale + kept + 3)

    def problem(self) -> str | None:
        """Why this is not a 2-D slice `read_image` can convert, or None. Checked before anything is decoded."""
        if self.pages != 1:
            return f"multi-page {self.kind} ({self.pages} pages); expected one 2-D slice per file"
        if self.depth != 1:
            return f"volumetric image (depth {self.depth}); expected one 2-D slice per file"
        if self.channels > MAX_CHANNELS:
            return f"{self.channels} channels per pixel; expected gray, RGB or RGBA (at most {MAX_CHANNELS})"
        if self.dtype is None or self.dtype.type not in _SLICE_DTYPES:
            return f"unsupported pixel type {self.dtype or 'unknown'} (expected uint8 or uint16)"
        return None


def _tiff_header(tif: tifffile.TiffFile) -> ImageHeader:
    page = tif.pages[0]
    # Header tags, not page.shape: a volumetric page's shape starts with its depth, so shape[:2] is not (H, W).
    pages = len(tif.pages)
    dtype = None if page.dtype is None else np.dtype(page.dtype)
    return ImageHeader(int(page.imagelength), int(page.imagewidth), int(page.imagedepth), pages,
                       int(page.samplesperpixel), dtype, "TIFF")


def _pil_header(im: Image.Image) -> ImageHeader:
    channels, dtype = _PIL_MODES.get(im.mode, (len(im.getbands()), None))
    return ImageHeader(im.height, im.width, 1, int(getattr(im, "n_frames", 1)), channels,
                       None if dtype is None else np.dtype(dtype), im.format or "image")


def image_header(path: str | Path) -> ImageHeader:
    """The full page shape and pixel type from the file header only; nothing is decoded."""
    path = Path(path)
    _check_file(path)
    try:
        if path.suffix.lower() in _TIFF_SUFFIXES:
            with tifffile.TiffFile(path) as tif:
                return _tiff_header(tif)
        with Image.open(path) as im:
            return _pil_header(im)
    except DataError:
        raise
    except Image.DecompressionBombError:  # PIL refuses > 2 x MAX_IMAGE_PIXELS from the header
        raise DataError(path, f"image too large (over {2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6:.0f} MP)") from None
    except Exception as e:  # decoders raise anything from OSError to zlib.error on a damaged file
        raise DataError(path, f"{CORRUPT} ({type(e).__name__}: {e})") from None


def _read_array(path: Path) -> np.ndarray:
    """Decodes a single-page image as stored (any dtype, 2-D or 3-D), after its header passed `ImageHeader.problem`."""
    _check_file(path)
    try:
        if path.suffix.lower() in _TIFF_SUFFIXES:
            with tifffile.TiffFile(path) as tif:
                _refuse(_tiff_header(tif), path)
                return _single_page(tif, path).asarray()
        with Image.open(path) as im:
            _refuse(_pil_header(im), path)
            if im.mode in ("P", "PA"):
                im = im.convert("RGBA" if "transparency" in im.info or im.mode == "PA" else "RGB")
            elif im.mode in ("I;16", "I;16B", "I;16L"):
                return np.asarray(im).astype(np.uint16)
            return np.asarray(im)
    except DataError:
        raise
    except Exception as e:  # decoders raise anything from OSError to zlib.error on a damaged file
        raise DataError(path, f"{CORRUPT} ({type(e).__name__}: {e})") from None


def _refuse(header: ImageHeader, path: Path) -> None:
    if problem := header.problem():
        raise DataError(path, problem)


def image_shape(path: str | Path) -> tuple[int, int]:
    """(H, W) from the file header only (discovery checks sizes without decoding every image); files that are not a
    2-D slice (several pages, a depth, more than 4 channels, an unsupported pixel type) are refused here."""
    path = Path(path)
    header = image_header(path)
    _refuse(header, path)
    return header.height, header.width


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

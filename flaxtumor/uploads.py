"""Turning user uploads (image files and .zip archives) into decoded slices, or one clear error naming the file.

Everything a browser can send is checked before anything large is decoded:
- the extension must be .tif/.tiff/.png/.jpg/.jpeg (or .zip for a patient) and agree with the file's magic bytes;
- image sizes come from the header (`flaxtumor.data.io.image_shape`) and are refused above `max_pixels` per image and
  `max_total_pixels` per submission, so a 10000x10000 PNG is never decoded;
- zips are opened with `zipfile`, never `extractall`: entry count and total uncompressed size are checked from the
  central directory first, then each image member is copied, with a byte budget, to `workdir/<index>_<basename>`, so
  names in the archive (`../x`, `/etc/x`) never choose where anything is written; archives with such names are refused
  outright.
Decoding itself is `flaxtumor.data.io.read_image` (16-bit, gray, RGBA and palette images are converted there; multi-page
TIFFs are refused there).
"""

from __future__ import annotations

import re
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from flaxtumor.data.io import IMAGE_SUFFIXES, DataError, image_shape, is_mask_name, natural_key, read_image

ZIP_SUFFIX = ".zip"
_KIND_BY_SUFFIX = {".tif": "TIFF", ".tiff": "TIFF", ".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".zip": "ZIP"}
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),  # BigTIFF
    (b"MM\x00+", "TIFF"),
    (b"PK\x03\x04", "ZIP"),
    (b"PK\x05\x06", "ZIP"),  # an empty archive
)
_SUFFIX_FOR_KIND = {"TIFF": ".tif", "PNG": ".png", "JPEG": ".jpg", "ZIP": ".zip"}
_CHUNK = 1 << 20


class UploadError(ValueError):
    """A bad upload; the message names the file and the problem and is shown to the user as is."""


@dataclass(frozen=True)
class UploadLimits:
    """Upper bounds on one submission (documented in the UI and the README)."""

    max_files: int = 200  # images per submission; an LGG patient has 20-88 slices
    max_pixels: int = 4096 * 4096  # per image (16.8 MP), read from the header before decoding
    max_total_pixels: int = 64 * 2**20  # per submission (67 MP, ~200 MB as uint8 RGB): bounds server memory
    min_side: int = 32  # smaller images are not MRI slices the models can say anything about
    max_zip_entries: int = 1000  # a patient folder holds ~2 x 88 files (slices + masks)
    max_zip_bytes: int = 256 * 2**20  # total uncompressed size of a zip (zip-bomb guard)

    def describe(self) -> str:
        return (
            f"up to {self.max_files} images per submission, {self.max_pixels / 1e6:.1f} MP per image, "
            f"{self.max_total_pixels / 1e6:.1f} MP in total, sides of at least {self.min_side} px; "
            f"zips with at most {self.max_zip_entries} entries and {self.max_zip_bytes // 2**20} MiB uncompressed"
        )


@dataclass(frozen=True)
class UploadedImage:
    name: str  # as the user knows it: "slice.png" or "patient.zip/TCGA_x/TCGA_x_12.tif"
    image: np.ndarray  # uint8 (H, W, 3)


@dataclass(frozen=True)
class _Pending:
    name: str
    path: Path


def display_name(path: str | Path) -> str:
    """Gradio keeps an upload's original basename inside a per-upload cache folder."""
    return Path(path).name


def load_single(path: str | Path | None, limits: UploadLimits) -> UploadedImage:
    """One slice from one uploaded image file."""
    if path is None:
        raise UploadError("No file uploaded: choose a .tif, .tiff, .png or .jpg slice (or pick an example).")
    path = Path(path)
    (pending,) = _check_sizes([_Pending(display_name(path), path)], limits)
    return _decode(pending)


def load_many(paths: Sequence[str | Path] | None, limits: UploadLimits, workdir: Path) -> tuple[list[UploadedImage], int]:
    """Slices of one patient from image files and/or zips, in natural name order, plus the number of masks skipped.

    Zip members are written under `workdir` (a fresh per-request temp dir that the caller deletes)."""
    if not paths:
        raise UploadError("No files uploaded: choose the slices of one patient, or a .zip of the patient's folder.")
    pending: list[_Pending] = []
    skipped_masks = 0
    for raw in paths:
        path = Path(raw)
        name = display_name(path)
        if _check_kind(path, name, allow_zip=True) == "zip":
            members, masks = _expand_zip(path, name, limits, workdir, start=len(pending))
            pending += members
            skipped_masks += masks
        elif is_mask_name(name):
            skipped_masks += 1
        else:
            pending.append(_Pending(name, path))
        if len(pending) > limits.max_files:
            raise UploadError(f"Too many images: more than {limits.max_files} in one submission (upload one patient).")
    if not pending:
        raise UploadError(f"No images to analyse: all {skipped_masks} uploaded files are ground-truth masks (*_mask.*).")
    pending.sort(key=lambda p: natural_key(PurePosixPath(p.name).name))
    return [_decode(p) for p in _check_sizes(pending, limits)], skipped_masks


def _sniff(path: Path) -> str | None:
    with path.open("rb") as f:
        head = f.read(8)
    return next((kind for magic, kind in _MAGIC if head.startswith(magic)), None)


def _check_kind(path: Path, name: str, allow_zip: bool) -> str:
    """'image' or 'zip' when the extension is accepted and the content matches it."""
    suffix = Path(name).suffix.lower()
    accepted = IMAGE_SUFFIXES + ((ZIP_SUFFIX,) if allow_zip else ())
    if suffix not in accepted:
        what = f"extension {suffix!r}" if suffix else "no extension"
        raise UploadError(f"{name}: unsupported file type ({what}); accepted: {', '.join(accepted)}.")
    if not path.is_file():
        raise UploadError(f"{name}: the upload did not arrive (file missing on the server); please upload it again.")
    if path.stat().st_size == 0:
        raise UploadError(f"{name}: zero-byte file.")
    expected, found = _KIND_BY_SUFFIX[suffix], _sniff(path)
    if found is None:
        raise UploadError(f"{name}: not a valid {expected} file (unrecognised content; is it an image at all?).")
    if found != expected:
        raise UploadError(
            f"{name}: the content is {found} but the extension says {expected}; "
            f"rename it to {_SUFFIX_FOR_KIND[found]} (or re-export it as {expected})."
        )
    return "zip" if found == "ZIP" else "image"


def _expand_zip(path: Path, name: str, limits: UploadLimits, workdir: Path, start: int) -> tuple[list[_Pending], int]:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise UploadError(f"{name}: not a readable zip archive (corrupt or truncated: {e}).") from None
    with archive:
        infos = archive.infolist()
        if len(infos) > limits.max_zip_entries:
            raise UploadError(f"{name}: {len(infos)} entries; the limit is {limits.max_zip_entries} (upload one patient).")
        declared = sum(i.file_size for i in infos)
        if declared > limits.max_zip_bytes:
            raise UploadError(
                f"{name}: would expand to {declared / 2**20:.0f} MiB; the limit is {limits.max_zip_bytes // 2**20} MiB."
            )
        for info in infos:
            member = PurePosixPath(info.filename.replace("\\", "/"))
            if member.is_absolute() or ".." in member.parts or re.match(r"^[A-Za-z]:", info.filename):
                raise UploadError(f"{name}: member {info.filename!r} has an unsafe path; the archive is refused.")
        images = [i for i in infos if not i.is_dir() and _is_image_member(i.filename)]
        masks = [i for i in images if is_mask_name(i.filename)]
        images = [i for i in images if not is_mask_name(i.filename)]
        if not images:
            others = len([i for i in infos if not i.is_dir()])
            raise UploadError(
                f"{name}: the zip holds no slices ({', '.join(IMAGE_SUFFIXES)}); "
                f"found {others} other file(s), {len(masks)} of them masks."
            )
        if len(images) > limits.max_files:
            raise UploadError(f"{name}: {len(images)} images; the limit is {limits.max_files} per submission.")
        folders = sorted({str(PurePosixPath(i.filename).parent) for i in images})
        if len(folders) > 1:
            shown = ", ".join(folders[:3]) + (", ..." if len(folders) > 3 else "")
            raise UploadError(f"{name}: images in {len(folders)} folders ({shown}); upload one patient per zip.")
        pending = []
        budget = limits.max_zip_bytes
        for k, info in enumerate(images, start=start):
            display = f"{name}/{info.filename}"
            if info.flag_bits & 0x1:
                raise UploadError(f"{display}: encrypted zip members are not supported.")
            # Only a sanitised basename, under a fresh per-request dir: the archive never picks the destination.
            dest = workdir / f"{k:04d}_{_safe_basename(info.filename)}"
            budget -= _copy_member(archive, info, dest, display, budget)
            pending.append(_Pending(display, dest))
    return pending, len(masks)


def _is_image_member(filename: str) -> bool:
    member = PurePosixPath(filename)
    # macOS adds `__MACOSX/._x.tif` resource forks to zips; they are not images.
    hidden = member.name.startswith(".") or "__MACOSX" in member.parts
    return not hidden and member.suffix.lower() in IMAGE_SUFFIXES


def _safe_basename(filename: str) -> str:
    base = PurePosixPath(filename.replace("\\", "/")).name
    return re.sub(r"[^A-Za-z0-9._-]", "_", base)[-120:] or "member"


def _copy_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path, display: str, budget: int) -> int:
    """Copies one member with a byte budget (headers can lie; the budget cannot), returning the bytes written."""
    written = 0
    try:
        with archive.open(info) as src, dest.open("wb") as dst:
            while chunk := src.read(_CHUNK):
                written += len(chunk)
                if written > budget:
                    raise UploadError(f"{display}: expands past the zip size limit; the archive is refused.")
                dst.write(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as e:
        raise UploadError(f"{display}: corrupt zip member ({type(e).__name__}: {e}).") from None
    return written


def _problem(e: DataError) -> str:
    """The part of a DataError after its path (the path may be a temp file the user never saw)."""
    text, prefix = str(e), f"{e.path}: "
    return text[len(prefix) :] if text.startswith(prefix) else text


def _check_sizes(pending: list[_Pending], limits: UploadLimits) -> list[_Pending]:
    total = 0
    for p in pending:
        _check_kind(p.path, p.name, allow_zip=False)
        try:
            h, w = image_shape(p.path)
        except DataError as e:
            raise UploadError(f"{p.name}: {_problem(e)}") from None
        except Image.DecompressionBombError:
            raise UploadError(f"{p.name}: image too large (PIL refuses it as a decompression bomb).") from None
        if h * w > limits.max_pixels:
            raise UploadError(
                f"{p.name}: image too large ({w}x{h} = {h * w / 1e6:.1f} MP); the limit is {limits.max_pixels / 1e6:.1f} MP."
            )
        if min(h, w) < limits.min_side:
            raise UploadError(f"{p.name}: image too small ({w}x{h}); sides must be at least {limits.min_side} px.")
        total += h * w
        if total > limits.max_total_pixels:
            raise UploadError(
                f"{p.name}: the submission exceeds {limits.max_total_pixels / 1e6:.1f} MP in total; upload fewer or smaller slices."
            )
    return pending


def _decode(p: _Pending) -> UploadedImage:
    try:
        return UploadedImage(p.name, read_image(p.path))
    except DataError as e:
        raise UploadError(f"{p.name}: {_problem(e)}") from None
    except Image.DecompressionBombError:
        raise UploadError(f"{p.name}: image too large (PIL refuses it as a decompression bomb).") from None

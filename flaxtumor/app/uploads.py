"""Turning user uploads (image files and .zip archives) into decoded slices, or one clear error naming the file.

Everything a browser can send is checked before anything large is decoded or written:
- the extension must be .tif/.tiff/.png/.jpg/.jpeg (or .zip for a patient) and agree with the file's magic bytes;
- the file header (`flaxtumor.data.io.image_header`) gives the full page shape (height, width, depth, pages, channels)
  and pixel type: anything that is not a 2-D slice is refused, and so is an image whose decoding would need more than
  `max_image_bytes`, or a submission whose decoded images would need more than `max_memory_bytes`;
- zips are opened with `zipfile`, never `extractall`. The End Of Central Directory record is read first (by us, so a
  400k-entry index is never parsed), then names are checked (no `..` anywhere, no absolute or drive paths, no symbolic
  links) and declared sizes summed; only then is each image member copied to `workdir/<index>_<basename>`, so names
  in the archive never choose where anything is written;
- one byte budget per submission (`max_submission_bytes`) covers the uploaded files and everything unpacked from all
  its zips together: declared sizes are checked before the first byte is written, and actual bytes while copying
  (headers can lie).
- ground-truth masks (`<slice>_mask.<ext>` beside their slice, loose or in the same zip folder) go through every
  check an image goes through, are paired with their slice by `flaxtumor.truth.pair_masks`, decoded by
  `flaxtumor.data.io.read_mask` (binary masks only) and must have their slice's size;
- NIfTI volumes (`.nii`, `.nii.gz`, loose files only) are checked by `flaxtumor.app.nifti_uploads` (magic bytes,
  header shape and voxel budget) before nibabel reads them, and count towards the disk budget.
Messages never carry a server path or an exception's class name: decoder failures are reported in words.
Decoding itself is `flaxtumor.data.io.read_image` (16-bit, gray, RGBA and palette images are converted there).
"""

from __future__ import annotations

import re
import stat
import struct
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

import numpy as np

from flaxtumor.app import nifti_uploads

from flaxtumor.data.io import (
    CORRUPT,
    IMAGE_SUFFIXES,
    DataError,
    ImageHeader,
    image_header,
    is_mask_name,
    natural_key,
    read_image,
    read_mask,
)
from flaxtumor.truth import pair_masks

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
MiB = 2**20


class UploadError(ValueError):
    """A bad upload; the message names the file and the problem and is shown to the user (escaped) as is."""


@dataclass(frozen=True)
class UploadLimits:
    """Upper bounds on one submission (documented in the UI and the README)."""

    max_files: int = 200  # images per submission; an LGG patient has 20-88 slices
    max_pixels: int = 4096 * 4096  # per image (16.8 MP), read from the header before decoding
    max_total_pixels: int = 64 * MiB  # per submission (67 MP, ~200 MB as uint8 RGB)
    min_side: int = 32  # smaller images are not MRI slices the models can say anything about
    # Memory, from the header: the estimated peak of decoding one image (4096² RGB uint8 needs 96 MiB, gray uint16
    # 160 MiB), and per submission the decoded images kept for the request plus the largest decode.
    max_image_bytes: int = 192 * MiB
    max_memory_bytes: int = 320 * MiB
    max_zip_entries: int = 1000  # a patient folder holds ~2 x 88 files (slices + masks)
    # Disk: the uploaded files plus everything unpacked from all zips of one submission together.
    max_submission_bytes: int = 512 * MiB
    # NIfTI: voxels per 3-D volume (256³; BraTS volumes have 240x240x155). Reading one takes ~24 bytes a voxel at peak.
    max_volume_voxels: int = 256**3

    def describe(self) -> str:
        return (
            f"up to {self.max_files} images per submission, {self.max_pixels / 1e6:.1f} MP per image, "
            f"{self.max_total_pixels / 1e6:.1f} MP in total, sides of at least {self.min_side} px; "
            f"{self.max_image_bytes // MiB} MiB of memory to decode one image and {self.max_memory_bytes // MiB} MiB "
            f"per submission (from the file headers); {self.max_submission_bytes // MiB} MiB on disk per submission "
            f"(uploads plus unpacked zips); zips with at most {self.max_zip_entries} entries; NIfTI volumes of at "
            f"most {self.max_volume_voxels / 1e6:.1f} M voxels"
        )


@dataclass(frozen=True)
class UploadedImage:
    name: str  # as the user knows it: "slice.png" or "patient.zip/TCGA_x/TCGA_x_12.tif"
    image: np.ndarray  # uint8 (H, W, 3)
    truth: np.ndarray | None = None  # bool (H, W): the slice's uploaded ground-truth mask, if any


class Submission(NamedTuple):
    """What one patient-tab submission holds: decoded slices (with their truth when uploaded), and the NIfTI case
    with a writer of its reference header (None without NIfTI files)."""

    images: list[UploadedImage]
    nifti: Any = None  # flaxtumor.data.nifti.NiftiCase
    nifti_reference: Callable[[Path], None] | None = None


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


def load_many(paths: Sequence[str | Path] | None, limits: UploadLimits, workdir: Path) -> Submission:
    """Slices of one or more patients from image files and/or zips, in natural name order, with their ground-truth
    masks when uploaded beside them; and NIfTI volumes as one more patient.

    Zip members are written under `workdir` (a fresh per-request private dir that the caller deletes), within one byte
    budget for the whole submission, checked from the declared sizes of all zips before anything is written."""
    if not paths:
        raise UploadError("No files uploaded: choose the slices of one patient, or a .zip of the patient's folder.")
    if len(paths) > 2 * limits.max_files:  # slices and their masks; checked before any file is opened
        raise UploadError(f"Too many files: {len(paths)} in one submission; the limit is {limits.max_files} images.")
    budget = _Budget(limits.max_submission_bytes)
    files: list[_Pending] = []
    zips: list[tuple[Path, str, list[zipfile.ZipInfo]]] = []
    volumes: list[tuple[str, Path, nifti_uploads.NiftiHeader]] = []
    for raw in paths:  # first pass: check everything, write nothing
        path = Path(raw)
        name = display_name(path)
        kind = _check_kind(path, name, allow_zip=True)
        budget.plan(path.stat().st_size, name, uploaded=True)
        if kind == "zip":
            zips.append((path, name, _plan_zip(path, name, limits, budget)))
        elif kind == "nifti":
            volumes.append((name, path, _nifti_header(path, name)))
        else:
            files.append(_Pending(name, path))
        slices = [f for f in files if not is_mask_name(f.name)]
        if len(slices) + sum(_count_images(z[2]) for z in zips) > limits.max_files:
            raise UploadError(f"Too many images: more than {limits.max_files} in one submission (upload one patient).")
    _nifti_budget(volumes, limits)
    pending = list(files)
    for path, name, members in zips:  # second pass: copy, with the budget left after the uploads themselves
        pending += _copy_members(path, name, members, workdir, start=len(pending), budget=budget)
    if not volumes and all(is_mask_name(p.name) for p in pending):
        raise UploadError(f"No images to analyse: all {len(pending)} uploaded files are ground-truth masks (*_mask.*).")
    images = _paired(pending)
    images.sort(key=lambda pair: natural_key(PurePosixPath(pair[0].name).name))
    _check_sizes([p for pair in images for p in pair if p is not None], limits)
    decoded = [_decode(image, mask) for image, mask in images]
    if not volumes:
        return Submission(decoded)
    case, reference = _load_nifti(volumes, workdir, limits)
    return Submission(decoded, case, reference)


def _count_images(members: list[zipfile.ZipInfo]) -> int:
    return sum(1 for m in members if not is_mask_name(m.filename))


def _paired(pending: list[_Pending]) -> list[tuple[_Pending, _Pending | None]]:
    """(slice, its mask or None) for every slice: a mask pairs with the slice whose name it extends by `_mask`, in
    the same folder (`flaxtumor.truth.pair_masks`, on the names the user knows)."""
    by_name = {PurePosixPath(p.name): p for p in pending}
    try:
        images, pairs = pair_masks(list(by_name))
    except DataError as e:
        raise UploadError(f"{PurePosixPath(e.path)}: {e.problem}; the masks are refused.") from None
    return [(by_name[PurePosixPath(i)], by_name[PurePosixPath(pairs[i])] if i in pairs else None) for i in images]


def _nifti_header(path: Path, name: str) -> nifti_uploads.NiftiHeader:
    try:
        return nifti_uploads.read_header(path, name)
    except nifti_uploads.NiftiUploadError as e:
        raise UploadError(str(e)) from None


def _nifti_budget(volumes: list[tuple[str, Path, nifti_uploads.NiftiHeader]], limits: UploadLimits) -> None:
    try:
        nifti_uploads.check_budget([(name, header) for name, _, header in volumes], limits.max_volume_voxels)
    except nifti_uploads.NiftiUploadError as e:
        raise UploadError(str(e)) from None


def _load_nifti(volumes: list[tuple[str, Path, Any]], workdir: Path, limits: UploadLimits) -> tuple[Any, Any]:
    folder = workdir / "nifti"  # its own folder: the volumes' names never meet the zip members'
    folder.mkdir()
    try:
        return nifti_uploads.load([(name, path) for name, path, _ in volumes], folder, limits.min_side)
    except nifti_uploads.NiftiUploadError as e:
        raise UploadError(str(e)) from None


class _Budget:
    """Bytes one submission may put on the server's disk: its uploaded files plus everything unpacked from its zips.
    Planning charges the uploads and the zips' declared sizes before anything is written; copying charges every chunk
    before it is written, so a zip whose headers lie cannot write past the limit either."""

    def __init__(self, limit: int):
        self.limit, self.planned, self.on_disk = limit, 0, 0

    def plan(self, n: int, name: str, uploaded: bool = False) -> None:
        self.planned += n
        self.on_disk += n if uploaded else 0
        if self.planned > self.limit:
            raise UploadError(
                f"{name}: the submission would put {self.planned / MiB:.0f} MiB on the server's disk (uploaded files "
                f"plus unpacked zips); the limit is {self.limit // MiB} MiB per submission."
            )

    def write(self, n: int, display: str) -> None:
        self.on_disk += n
        if self.on_disk > self.limit:
            raise UploadError(f"{display}: expands past its declared size and the submission's disk limit "
                              f"({self.limit // MiB} MiB); the archive is refused.")


def _sniff(path: Path) -> str | None:
    with path.open("rb") as f:
        head = f.read(8)
    return next((kind for magic, kind in _MAGIC if head.startswith(magic)), None)


def _check_kind(path: Path, name: str, allow_zip: bool) -> str:
    """'image', 'zip' or 'nifti' (zip and NIfTI with `allow_zip`) when the extension is accepted and the content
    matches it (a NIfTI file's content is checked with its header, by `_nifti_header`)."""
    suffix = Path(name).suffix.lower()
    accepted = IMAGE_SUFFIXES + ((ZIP_SUFFIX, *nifti_uploads.NIFTI_SUFFIXES) if allow_zip else ())
    is_nifti = allow_zip and nifti_uploads.nifti_suffix(name) is not None
    if suffix not in accepted and not is_nifti:
        what = f"extension {suffix!r}" if suffix else "no extension"
        raise UploadError(f"{name}: unsupported file type ({what}); accepted: {', '.join(accepted)}.")
    if not path.is_file():
        raise UploadError(f"{name}: the upload did not arrive (file missing on the server); please upload it again.")
    if path.stat().st_size == 0:
        raise UploadError(f"{name}: zero-byte file.")
    if is_nifti:
        return "nifti"
    expected, found = _KIND_BY_SUFFIX[suffix], _sniff(path)
    if found is None:
        raise UploadError(f"{name}: not a valid {expected} file (unrecognised content; is it an image at all?).")
    if found != expected:
        raise UploadError(
            f"{name}: the content is {found} but the extension says {expected}; "
            f"rename it to {_SUFFIX_FOR_KIND[found]} (or re-export it as {expected})."
        )
    return "zip" if found == "ZIP" else "image"


_EOCD = struct.Struct("<4s4H2LH")  # signature, disks (2), entries on this disk, entries, CD size, CD offset, comment
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")
_MAX_CD_BYTES_PER_ENTRY = 1024  # a central directory entry is 46 bytes plus its name and extras


def central_directory(path: Path, name: str) -> tuple[int, int]:
    """(entries, central directory bytes) from the End Of Central Directory record, without reading the index:
    `zipfile` parses every entry before one can count them (400k entries: ~2 s and ~220 MB). Read the way `zipfile`
    reads it (the last record; a zip64 record right before its locator wins), so both see the same index."""
    size = path.stat().st_size
    with path.open("rb") as f:
        # The record ends the file, followed only by a comment; a zip64 record and locator may precede it.
        tail_len = min(size, _ZIP64_EOCD.size + _ZIP64_LOCATOR.size + _EOCD.size + 0xFFFF)
        f.seek(size - tail_len)
        tail = f.read(tail_len)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < _EOCD.size:
        raise UploadError(f"{name}: not a readable zip archive (its end of central directory record is missing).")
    _, _, _, _, entries, cd_size, _, _ = _EOCD.unpack_from(tail, at)
    locator, record = at - _ZIP64_LOCATOR.size, at - _ZIP64_LOCATOR.size - _ZIP64_EOCD.size
    if record >= 0 and tail[locator : locator + 4] == b"PK\x06\x07" and tail[record : record + 4] == b"PK\x06\x06":
        entries, cd_size = _ZIP64_EOCD.unpack_from(tail, record)[7:9]
    return int(entries), int(cd_size)


def _plan_zip(path: Path, name: str, limits: UploadLimits, budget: _Budget) -> list[zipfile.ZipInfo]:
    """The members to copy (slices and their masks); refuses the archive before anything is written."""
    entries, cd_size = central_directory(path, name)
    if entries > limits.max_zip_entries:
        raise UploadError(f"{name}: {entries} entries; the limit is {limits.max_zip_entries} (upload one patient).")
    if cd_size > limits.max_zip_entries * _MAX_CD_BYTES_PER_ENTRY:
        raise UploadError(f"{name}: its index is {cd_size // 1024} KiB; the limit is "
                          f"{limits.max_zip_entries * _MAX_CD_BYTES_PER_ENTRY // 1024} KiB (upload one patient).")
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        raise UploadError(f"{name}: not a readable zip archive (corrupt or truncated).") from None
    if len(infos) > limits.max_zip_entries:  # the record undercounted; the index is bounded by its size anyway
        raise UploadError(f"{name}: {len(infos)} entries; the limit is {limits.max_zip_entries} (upload one patient).")
    for info in infos:
        if problem := unsafe_member(info):
            raise UploadError(f"{name}: member {info.filename!r} {problem}; the archive is refused.")
    members = [i for i in infos if not i.is_dir() and _is_image_member(i.filename)]
    masks = [i for i in members if is_mask_name(i.filename)]
    images = [i for i in members if not is_mask_name(i.filename)]
    if not images:
        others = len([i for i in infos if not i.is_dir()])
        volumes = sum(1 for i in infos if nifti_uploads.nifti_suffix(i.filename))
        hint = f" NIfTI volumes ({volumes} here): upload the .nii/.nii.gz files themselves, not zipped." if volumes else ""
        raise UploadError(
            f"{name}: the zip holds no slices ({', '.join(IMAGE_SUFFIXES)}); "
            f"found {others} other file(s), {len(masks)} of them masks.{hint}"
        )
    if len(images) > limits.max_files:
        raise UploadError(f"{name}: {len(images)} images; the limit is {limits.max_files} per submission.")
    folders = sorted({str(PurePosixPath(i.filename).parent) for i in members})
    if len(folders) > 1:
        shown = ", ".join(folders[:3]) + (", ..." if len(folders) > 3 else "")
        raise UploadError(f"{name}: images in {len(folders)} folders ({shown}); upload one patient per zip.")
    for info in members:
        if info.flag_bits & 0x1:
            raise UploadError(f"{name}/{info.filename}: encrypted zip members are not supported.")
    budget.plan(sum(i.file_size for i in members), name)
    return members


def unsafe_member(info: zipfile.ZipInfo) -> str | None:
    """Why a member name or type is unsafe, or None. Names never choose a destination (members are copied under
    sanitised basenames), but an archive that tries to escape is not a patient folder: it is refused outright."""
    raw = info.filename
    member = PurePosixPath(raw.replace("\\", "/"))  # `..\x` is a parent reference on Windows
    if member.is_absolute() or re.match(r"^[A-Za-z]:", raw):
        return "has an absolute or drive path"
    if ".." in member.parts:  # anywhere: `p/../../x` climbs out as surely as `../x`
        return "has an unsafe path ('..')"
    if any(ord(c) < 32 for c in raw):
        return "has control characters in its name"
    if info.create_system == 3 and stat.S_ISLNK(info.external_attr >> 16):  # unix mode bits in the high word
        return "is a symbolic link"
    return None


def _is_image_member(filename: str) -> bool:
    member = PurePosixPath(filename)
    # macOS adds `__MACOSX/._x.tif` resource forks to zips; they are not images.
    hidden = member.name.startswith(".") or "__MACOSX" in member.parts
    return not hidden and member.suffix.lower() in IMAGE_SUFFIXES


def _safe_basename(filename: str) -> str:
    base = PurePosixPath(filename.replace("\\", "/")).name
    return re.sub(r"[^A-Za-z0-9._-]", "_", base)[-120:] or "member"


def _copy_members(path: Path, name: str, images: list[zipfile.ZipInfo], workdir: Path, start: int,
                  budget: _Budget) -> list[_Pending]:
    pending = []
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        raise UploadError(f"{name}: not a readable zip archive (corrupt or truncated).") from None
    with archive:
        for k, info in enumerate(images, start=start):
            display = f"{name}/{info.filename}"
            # Only a sanitised basename, under a fresh per-request dir: the archive never picks the destination.
            dest = workdir / f"{k:04d}_{_safe_basename(info.filename)}"
            _copy_member(archive, info, dest, display, budget)
            pending.append(_Pending(display, dest))
    return pending


def _copy_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path, display: str, budget: _Budget) -> None:
    """Copies one member in chunks; every chunk is charged to the budget before it is written."""
    try:
        with archive.open(info) as src, dest.open("wb") as dst:
            while chunk := src.read(_CHUNK):
                budget.write(len(chunk), display)
                dst.write(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError):
        raise UploadError(f"{display}: corrupt zip member (its data cannot be decompressed).") from None
    except NotImplementedError:
        raise UploadError(f"{display}: the zip uses a compression method that is not supported.") from None


def _problem(e: DataError) -> str:
    """The problem in words: a decoder's own message can hold the temp path and its class name, so it is dropped."""
    if e.problem.startswith(CORRUPT):
        return f"{CORRUPT} (damaged, truncated or not really this kind of file)"
    return e.problem


def _header(p: _Pending) -> ImageHeader:
    _check_kind(p.path, p.name, allow_zip=False)
    try:
        header = image_header(p.path)
    except DataError as e:
        raise UploadError(f"{p.name}: {_problem(e)}.") from None
    if problem := header.problem():
        raise UploadError(f"{p.name}: {problem}.")
    return header


def _check_sizes(pending: list[_Pending], limits: UploadLimits) -> list[_Pending]:
    """Every image's header against the pixel and memory budgets, before any image is decoded."""
    total_pixels, kept, largest = 0, 0, 0
    for p in pending:
        header = _header(p)
        h, w = header.height, header.width
        if h * w > limits.max_pixels:
            raise UploadError(
                f"{p.name}: image too large ({w}x{h} = {h * w / 1e6:.1f} MP); the limit is {limits.max_pixels / 1e6:.1f} MP."
            )
        if min(h, w) < limits.min_side:
            raise UploadError(f"{p.name}: image too small ({w}x{h}); sides must be at least {limits.min_side} px.")
        need = header.decode_bytes()
        if need > limits.max_image_bytes:
            raise UploadError(
                f"{p.name}: decoding it would need {need / MiB:.0f} MiB of memory ({w}x{h}, {header.channels} "
                f"channel(s) of {header.dtype}); the limit is {limits.max_image_bytes // MiB} MiB per image."
            )
        total_pixels += h * w
        if total_pixels > limits.max_total_pixels:
            raise UploadError(
                f"{p.name}: the submission exceeds {limits.max_total_pixels / 1e6:.1f} MP in total; upload fewer or smaller slices."
            )
        kept, largest = kept + h * w * 3, max(largest, need)  # decoded slices stay uint8 RGB for the request
        if kept + largest > limits.max_memory_bytes:
            raise UploadError(
                f"{p.name}: the submission would need {(kept + largest) / MiB:.0f} MiB of memory to decode; "
                f"the limit is {limits.max_memory_bytes // MiB} MiB (upload fewer or smaller slices)."
            )
    return pending


def _decode(p: _Pending, mask: _Pending | None = None) -> UploadedImage:
    try:
        image = read_image(p.path)
    except DataError as e:
        raise UploadError(f"{p.name}: {_problem(e)}.") from None
    if mask is None:
        return UploadedImage(p.name, image)
    try:
        truth = read_mask(mask.path)
    except DataError as e:
        raise UploadError(f"{mask.name}: {_problem(e)}.") from None
    if truth.shape != image.shape[:2]:
        (h, w), (th, tw) = image.shape[:2], truth.shape
        raise UploadError(f"{mask.name}: the mask is {tw}x{th} px but its slice {PurePosixPath(p.name).name} is "
                          f"{w}x{h} px.")
    return UploadedImage(p.name, image, truth)

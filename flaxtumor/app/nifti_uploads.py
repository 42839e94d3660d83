"""NIfTI uploads (`.nii`, `.nii.gz`): checked like every other upload, then read by `flaxtumor.data.nifti.load_case`.

A submission's NIfTI files are one patient: three volumes named for their role, or one 4-D volume, optionally a
truth segmentation named `*_seg*` / `*_mask*` (the conventions are `flaxtumor.data.nifti`'s). Before nibabel reads
anything:
- the content must match the extension: gzip magic for `.nii.gz`, and inside it (or at the start of a `.nii`) a
  single-file NIfTI-1 (`n+1` at offset 344) or NIfTI-2 (`n+2` at offset 4) header; the header is read with a bounded
  read, so a gzip bomb is never inflated;
- the header's shape is checked: 2 to 4 dimensions with at most 3 volumes on the 4th, at most `max_volume_voxels`
  per volume, and the data must start within the first MiB (`vox_offset`), so nibabel never seeks far into an inflated
  stream;
- the files are linked under sanitised names into the request's private folder, and every error names the file as the
  user uploaded it, without server paths or exception details.
"""

from __future__ import annotations

import gzip
import os
import re
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flaxtumor.data.io import DataError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
GZIP_MAGIC = b"\x1f\x8b"
MAX_VOX_OFFSET = 2**20  # header + extensions; real files start their data at 352 or 544 (+ small extensions)
_HEADER_BYTES = 540  # NIfTI-2's header; NIfTI-1's is 348


class NiftiUploadError(ValueError):
    """A refused NIfTI upload; `uploads` turns it into an UploadError (the message names the file)."""


def nifti_suffix(name: str) -> str | None:
    """".nii.gz" or ".nii" when the name is a NIfTI file's, else None."""
    lower = name.lower()
    return next((s for s in NIFTI_SUFFIXES if lower.endswith(s)), None)


@dataclass(frozen=True)
class NiftiHeader:
    version: int  # 1 or 2
    shape: tuple[int, ...]

    @property
    def voxels_per_volume(self) -> int:
        return int(np.prod(self.shape[:3], dtype=np.int64))

    @property
    def volumes(self) -> int:
        return int(np.prod(self.shape[3:], dtype=np.int64)) if len(self.shape) > 3 else 1


def _head(path: Path, name: str, gzipped: bool) -> bytes:
    try:
        if gzipped:
            with gzip.open(path, "rb") as f:
                return f.read(_HEADER_BYTES)  # bounded: only the header is ever inflated here
        with path.open("rb") as f:
            return f.read(_HEADER_BYTES)
    except (OSError, EOFError, zlib.error):
        raise NiftiUploadError(f"{name}: not a readable gzip file (corrupt or truncated).") from None


def read_header(path: Path, name: str) -> NiftiHeader:
    """The file's NIfTI header (shape), after checking that the content is what the extension says."""
    suffix = nifti_suffix(name)
    with path.open("rb") as f:
        magic = f.read(2)
    if suffix == ".nii.gz" and magic != GZIP_MAGIC:
        raise NiftiUploadError(f"{name}: not gzip-compressed, although it is named .nii.gz (rename it to .nii if it is "
                               "an uncompressed NIfTI file).")
    if suffix == ".nii" and magic == GZIP_MAGIC:
        raise NiftiUploadError(f"{name}: gzip-compressed, although it is named .nii; rename it to .nii.gz.")
    head = _head(path, name, gzipped=suffix == ".nii.gz")
    for endian in "<>":
        if len(head) >= 348 and struct.unpack(f"{endian}i", head[:4])[0] == 348 and head[344:348] == b"n+1\0":
            dims = struct.unpack(f"{endian}8h", head[40:56])
            offset = struct.unpack(f"{endian}f", head[108:112])[0]
            return _checked(name, 1, dims, offset)
        if len(head) >= 540 and struct.unpack(f"{endian}i", head[:4])[0] == 540 and head[4:8] == b"n+2\0":
            dims = struct.unpack(f"{endian}8q", head[16:80])
            offset = struct.unpack(f"{endian}q", head[168:176])[0]
            return _checked(name, 2, dims, offset)
    if len(head) >= 348 and head[344:348] == b"ni1\0":
        raise NiftiUploadError(f"{name}: a NIfTI header without its image (.hdr/.img pair); save the volume as one "
                               ".nii or .nii.gz file.")
    raise NiftiUploadError(f"{name}: not a valid NIfTI file (no NIfTI-1 or NIfTI-2 header; is it a volume at all?).")


def _checked(name: str, version: int, dims: Sequence[int], offset: float) -> NiftiHeader:
    ndim = int(dims[0])
    if not 1 <= ndim <= 7 or any(int(d) < 1 for d in dims[1 : ndim + 1]):
        raise NiftiUploadError(f"{name}: corrupt NIfTI header (dimensions {list(dims)}).")
    shape = tuple(int(d) for d in dims[1 : ndim + 1])
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if not 0 <= offset <= MAX_VOX_OFFSET:
        raise NiftiUploadError(f"{name}: corrupt NIfTI header (its data would start at byte {offset:g}).")
    return NiftiHeader(version, shape)


def check_budget(headers: Sequence[tuple[str, NiftiHeader]], max_voxels: int) -> None:
    """Refuses what would take too much memory to read, from the headers alone. Shapes the reader refuses with a
    clearer message (2-D data, a 4-D volume with other than 3 channels) pass when small."""
    for name, header in headers:
        if header.voxels_per_volume > max_voxels:
            shape = "x".join(map(str, header.shape))
            raise NiftiUploadError(f"{name}: a {shape} volume has {header.voxels_per_volume / 1e6:.1f} M voxels; the "
                                   f"limit is {max_voxels / 1e6:.1f} M per volume.")
        if header.volumes > 4:
            raise NiftiUploadError(f"{name}: {header.volumes} volumes in one file (shape {header.shape}); expected one "
                                   "3-D volume per role, or one 4-D volume of 3 (pre-contrast, FLAIR, post-contrast).")


def _stem(name: str) -> str:
    suffix = nifti_suffix(name) or ""
    return name[: len(name) - len(suffix)]


def patient_name(names: Sequence[str]) -> str:
    """The files' common stem (`BraTS_001_t1.nii.gz`, `BraTS_001_flair.nii.gz` -> `BraTS_001`), else "nifti"."""
    prefix = os.path.commonprefix([_stem(n) for n in names])
    return prefix.rstrip("_-. ") or "nifti"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[-120:] or "volume.nii.gz"


def _corrupt(problem: str) -> str:
    if problem.startswith("unreadable or corrupt NIfTI"):
        return "unreadable or corrupt NIfTI (damaged, truncated or not really NIfTI)"
    return problem.split("; or pass a mapping")[0]  # the API's way out; an uploader renames the file


def load(files: Sequence[tuple[str, Path]], workdir: Path, min_side: int) -> tuple[object, Callable[[Path], None]]:
    """(the `NiftiCase`, a function writing a reference for `nifti.write_mask` to a path) from the checked uploads
    (display name, path). The uploads are linked into `workdir` under sanitised names first."""
    from flaxtumor.data import nifti  # nibabel: only when NIfTI is uploaded

    linked: dict[Path, str] = {}
    for name, path in files:
        dest = workdir / _safe(name)
        if dest in linked:
            raise NiftiUploadError(f"{name}: two NIfTI files with this name in one submission.")
        os.symlink(Path(path).resolve(), dest)
        linked[dest] = name
    try:
        case = nifti.load_case(list(linked), patient=patient_name(list(linked.values())))
    except DataError as e:
        where = linked.get(e.path, "The NIfTI upload")
        raise NiftiUploadError(f"{where}: {_corrupt(e.problem)}.") from None
    h, w = case.orientation.sliced_shape[1:]
    if min(h, w) < min_side:
        raise NiftiUploadError(f"{linked[case.reference]}: axial slices of {w}x{h} px; sides must be at least "
                               f"{min_side} px.")
    return case, _reference_writer(case.reference)


def _reference_writer(reference: Path) -> Callable[[Path], None]:
    """The reference's header (affine, orientation, form codes) on an empty uint8 volume of its grid: all that
    `nifti.write_mask` reads from it, kept after the request's folder is gone for re-rendered downloads."""
    import nibabel as nib

    ref = nib.load(reference)
    header = ref.header.copy()
    header.set_data_dtype(np.uint8)
    shape = tuple(int(s) for s in ref.shape[:3])

    def write(dest: Path) -> None:
        nib.save(type(ref)(np.zeros(shape, np.uint8), None, header=header), dest)

    return write

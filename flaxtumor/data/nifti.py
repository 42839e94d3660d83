"""NIfTI volumes in and out: a patient's co-registered 3-D MRI volumes -> the models' (H, W, 3) uint8 slices, and a
predicted mask volume -> a `.nii.gz` that overlays the input voxel-for-voxel.

**Out of domain.** The models were trained on kaggle_3m composites only: 256x256 axial slices of pre-contrast, FLAIR
and post-contrast MRI from the TCGA-LGG scanners and protocols, stored as uint8 RGB. This module turns NIfTI volumes
into composites of the same form, but volumes from other scanners, protocols, resolutions or skull-stripping (BraTS
included) are out of domain: expect the models to do worse there, and validate before trusting any output.

Inputs (`load_case`):

- **Three 3-D volumes named for their role**, in a folder or as a list of files. File names (`.nii` or `.nii.gz`) are
  split into tokens at `_`, `-`, `.` and spaces and matched case-insensitively (`ROLE_PATTERNS`):

  | role | tokens (`*`: any continuation) | e.g. |
  |---|---|---|
  | pre-contrast (T1) | `t1`, `t1n`, `t1w`, `t1pre`, `native`, `pre*` | `BraTS2021_00000_t1.nii.gz`, `...-t1n.nii.gz` |
  | FLAIR | `flair*`, `t2f`, `t2flair` | `..._flair.nii.gz`, `...-t2f.nii.gz` |
  | post-contrast (T1-Gd) | `t1ce`, `t1gd`, `t1c`, `t1post`, `t1wce`, `gd`, `post*` | `..._t1ce.nii.gz`, `...-t1c...` |
  | truth (binary mask) | `seg*`, `mask*` | `..._seg.nii.gz`, `..._mask.nii.gz` |
  | T2 (not used, skipped) | `t2`, `t2w` | `..._t2.nii.gz`, `...-t2w.nii.gz` |

  (`...-t1n` etc. are BraTS 2023's `BraTS-GLI-00000-000-t1n.nii.gz`.) When a name has tokens of several roles, they win
  in this order: truth, post-contrast, FLAIR, pre-contrast, T2 (`T1_post.nii.gz` is post-contrast, `t1_mask.nii.gz` a
  truth). In a folder, files that match no role are skipped; a file given explicitly must match one. Names that
  follow no convention can be given as a mapping `{"pre": path, "flair": path, "post": path}`.
- **One 4-D volume** of shape (X, Y, Z, 3) holding pre-contrast, FLAIR and post-contrast in that order on the **4th
  (last) axis**. NIfTI defines its first three axes as the spatial ones (the affine maps them), so channels can only be
  the 4th; a (3, X, Y, Z) array is not a valid layout and is refused with its shape. The Medical Segmentation
  Decathlon's 4-channel BraTS volumes (FLAIR, T1w, T1gd, T2w) are refused: split and reorder their channels first.
- **Truth**, optional: a binary (0/1) volume on the same grid, found by name (`seg*`, `mask*`) or given as `truth=`.
  Multi-label segmentations (BraTS labels 0/1/2/4) must be binarised first (label > 0 is the whole tumour, the closest
  BraTS region to kaggle_3m's FLAIR-abnormality masks).

Slicing: every volume is reoriented to the closest canonical orientation, RAS+ (`nibabel.as_closest_canonical`: +x to
the patient's right, +y anterior, +z superior), so "axial" means the third canonical axis whatever the file's storage
order (LPS, flipped or permuted axes). Slices run inferior to superior (slice 0 is the lowest), as kaggle_3m numbers
its slices. Each slice is laid out in the radiological display convention of axial DICOM: rows run anterior (top) to
posterior, as in kaggle_3m's slices, and columns run from the patient's right (image left) to the patient's left. A
slice therefore has H = the canonical y size and W = the canonical x size. Nothing is resampled: the voxel grid is the
file's own, and `flaxtumor.data.preprocess` resizes each slice to the checkpoint's image size; a field of view or
in-plane spacing far from kaggle_3m's 256x256 head-filling frames is one more domain shift.

Intensities: each role volume (each channel of a 4-D volume) is rescaled on its own, robustly: the 0.5 and 99.5
percentiles of its non-zero, finite voxels (the head region; background is zero in skull-stripped and most raw volumes)
map to 0 and 255, values outside are clipped, zero and non-finite voxels stay 0. That gives uint8 composites like
kaggle_3m's; the checkpoint's own preprocessing (`flaxtumor.data.preprocess`) then normalises them as recorded in the
checkpoint, exactly as in training.

Output: `write_mask` writes a (D, H, W) mask in the sliced frame back as a uint8 0/1 `.nii.gz` with the input's affine
and header, the canonical reorientation and the display layout undone, so it overlays the original volume
voxel-for-voxel.

Every bad input raises `flaxtumor.data.io.DataError` naming the file (or folder) and the problem.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

from flaxtumor.data.io import DataError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ROLES = ("pre", "flair", "post")  # the composite's channel order, as in kaggle_3m
ROLE_NAMES = {"pre": "pre-contrast (T1)", "flair": "FLAIR", "post": "post-contrast (T1-Gd)", "truth": "truth",
              "t2": "T2"}
TRUTH, SKIPPED = "truth", "t2"

# role -> (exact tokens, token prefixes), tried in this order (the first role with a matching token wins).
ROLE_PATTERNS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    TRUTH: ((), ("seg", "mask")),
    "post": (("t1ce", "t1gd", "t1c", "t1post", "t1wce", "gd"), ("post",)),
    "flair": (("t2f", "t2flair"), ("flair",)),
    "pre": (("t1", "t1n", "t1w", "t1pre", "native"), ("pre",)),
    SKIPPED: (("t2", "t2w"), ()),
}
PERCENTILES = (0.5, 99.5)  # robust intensity range, inside the non-zero head region
AFFINE_ATOL = 1e-3  # mm (translations) and mm per voxel (direction x spacing): co-registered volumes agree this well
_CANONICAL = axcodes2ornt(("R", "A", "S"))


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: str | Path) -> str:
    """`BraTS_001_t1.nii.gz` -> `BraTS_001_t1`."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


_SEPARATORS = r"[_\-.\s]+"


def _tokens(path: str | Path) -> list[str]:
    return [t for t in re.split(_SEPARATORS, nifti_stem(path).lower()) if t]


def _is_role_token(token: str, role: str) -> bool:
    exact, prefixes = ROLE_PATTERNS[role]
    return token in exact or token.startswith(prefixes)


def role_of(path: str | Path) -> str | None:
    """The role a file name announces: "pre", "flair", "post", "truth", "t2" (recognised, not used), or None."""
    tokens = _tokens(path)
    for role in ROLE_PATTERNS:
        if any(_is_role_token(t, role) for t in tokens):
            return role
    return None


def case_key(path: str | Path) -> str:
    """The file name without its role tokens (any role's, case kept): `BraTS2021_00042_t1ce.nii.gz` and
    `BraTS2021_00042_seg.nii.gz` -> `BraTS2021_00042`, `BraTS-GLI-00000-000-t1n.nii.gz` -> `BraTS-GLI-00000-000`,
    `t1.nii.gz` -> ``. Files of one patient share it, so a folder holding several patients can be split."""
    parts = re.split(f"({_SEPARATORS})", nifti_stem(path))  # token, separator, token, ...
    kept: list[str] = []
    for i in range(0, len(parts), 2):
        token = parts[i]
        if token and not any(_is_role_token(token.lower(), role) for role in ROLE_PATTERNS):
            kept.append((parts[i - 1] if kept else "") + token)
    return "".join(kept)


@dataclass(frozen=True)
class Orientation:
    """How the file's voxel axes relate to the sliced frame; enough to map a mask back onto the file's grid."""

    shape: tuple[int, int, int]  # spatial shape as stored in the file
    affine: np.ndarray  # the file's voxel -> world (mm) affine
    axcodes: tuple[str, str, str]  # the file's orientation, e.g. ("L", "P", "S")
    ornt: np.ndarray  # nibabel orientation: file axes -> canonical RAS+

    @classmethod
    def of(cls, img: Any) -> Orientation:
        affine = np.asarray(img.affine, np.float64)
        ornt = io_orientation(affine)
        return cls(tuple(int(s) for s in img.shape[:3]), affine, tuple(nib.aff2axcodes(affine)), ornt)

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        """(x, y, z) sizes in RAS+."""
        out = [0, 0, 0]
        for axis, (target, _) in enumerate(self.ornt):
            out[int(target)] = self.shape[axis]
        return tuple(out)

    @property
    def sliced_shape(self) -> tuple[int, int, int]:
        """(D, H, W) of the slice stack: axial slices, anterior->posterior rows, right->left columns."""
        x, y, z = self.canonical_shape
        return z, y, x

    def to_slices(self, volume: np.ndarray) -> np.ndarray:
        """A volume on the file's grid (spatial axes first, any trailing axes kept) -> (D, H, W, ...) slice stack."""
        canonical = nib.orientations.apply_orientation(volume, self.ornt)  # (x, y, z, ...) in RAS+
        canonical = canonical[::-1, ::-1]  # x: right->left (image columns), y: anterior->posterior (image rows)
        return np.moveaxis(canonical, (2, 1, 0), (0, 1, 2))  # (z, y, x, ...)

    def from_slices(self, stack: np.ndarray) -> np.ndarray:
        """The inverse of `to_slices` for a (D, H, W) stack: back onto the file's grid, voxel for voxel."""
        canonical = np.moveaxis(stack, (0, 1, 2), (2, 1, 0))[::-1, ::-1]
        return nib.orientations.apply_orientation(canonical, ornt_transform(_CANONICAL, self.ornt))


@dataclass(frozen=True)
class NiftiCase:
    """One patient's NIfTI input, sliced for the models."""

    patient: str
    slices: list[np.ndarray]  # D uint8 (H, W, 3) composites (pre-contrast, FLAIR, post-contrast), inferior -> superior
    truth: np.ndarray | None  # bool (D, H, W) in the same frame, or None
    reference: Path  # the volume whose affine and header `write_mask` copies (pre-contrast, or the 4-D volume)
    orientation: Orientation
    sources: dict[str, Path] = field(default_factory=dict)  # role -> file ("pre", "flair", "post" and maybe "truth")
    intensity_range: dict[str, tuple[float, float]] = field(default_factory=dict)  # role -> (value -> 0, value -> 255)

    @property
    def names(self) -> list[str]:
        """One name per slice, numbered from 1 like kaggle_3m's `<patient>_<n>.tif`."""
        return [f"{self.patient}_{k + 1}" for k in range(len(self.slices))]

    def images(self) -> np.ndarray:
        """uint8 (D, H, W, 3): the slices stacked, ready for `flaxtumor.data.preprocess`."""
        return np.stack(self.slices)

    def write_mask(self, mask_volume: np.ndarray, out_path: str | Path) -> Path:
        return write_mask(mask_volume, self.reference, out_path)


# ---- reading -------------------------------------------------------------------------------------------------------


def _load(path: Path) -> Any:
    """The NIfTI image (header only; data stays on disk), or a DataError."""
    if not path.is_file():
        raise DataError(path, "file not found")
    if not is_nifti(path):
        raise DataError(path, f"unsupported file type (expected {' or '.join(NIFTI_SUFFIXES)})")
    if path.stat().st_size == 0:
        raise DataError(path, "zero-byte file")
    try:
        img = nib.load(path)
    except Exception as e:  # nibabel raises ImageFileError, OSError, EOFError, zlib.error, ValueError ... on bad files
        raise DataError(path, f"unreadable or corrupt NIfTI ({type(e).__name__}: {e})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DataError(path, f"not a NIfTI image ({type(img).__name__})")
    return img


def _data(img: Any, path: Path) -> np.ndarray:
    try:
        return np.asarray(img.dataobj, dtype=np.float32)
    except Exception as e:  # a truncated or corrupt payload only shows when it is read
        raise DataError(path, f"unreadable or corrupt NIfTI ({type(e).__name__}: {e})") from None


def _spatial_ndim(img: Any, path: Path) -> tuple[int, ...]:
    """The shape with trailing singleton axes beyond the third dropped; refuses 2-D data."""
    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) < 3:
        raise DataError(path, f"2-D data (shape {shape}); expected a 3-D volume")
    return shape


def _check_in_plane(orientation: Orientation, path: Path) -> None:
    x, y, _ = orientation.canonical_shape
    if min(x, y) < 2:
        raise DataError(path, f"2-D data: shape {orientation.shape} is a single sagittal or coronal plane "
                              f"(axial slices would be {y}x{x}); expected a 3-D volume")


def _volume(path: Path) -> tuple[Any, np.ndarray]:
    img = _load(path)
    shape = _spatial_ndim(img, path)
    if len(shape) != 3:
        raise DataError(path, f"shape {shape}: expected a 3-D volume for one role")
    return img, _data(img, path).reshape(shape)


def robust_rescale(volume: np.ndarray, percentiles: tuple[float, float] = PERCENTILES
                   ) -> tuple[np.ndarray, tuple[float, float]]:
    """float volume -> (uint8 volume, (lo, hi)): lo..hi, the percentiles of the non-zero finite voxels, map to 0..255.

    Zero and non-finite voxels stay 0. A volume with no non-zero voxel maps to all zeros; a constant one to 255 inside.
    """
    head = np.isfinite(volume) & (volume != 0)
    out = np.zeros(volume.shape, np.uint8)
    if not head.any():
        return out, (0.0, 0.0)
    lo, hi = (float(v) for v in np.percentile(volume[head], percentiles))
    if hi > lo:
        scaled = np.clip((volume[head] - lo) / (hi - lo), 0.0, 1.0) * 255.0
        out[head] = np.rint(scaled).astype(np.uint8)
    else:
        out[head] = 255
    return out, (lo, hi)


def _read_truth(path: Path, orientation: Orientation, reference: Path) -> np.ndarray:
    img = _load(path)
    shape = _spatial_ndim(img, path)
    if shape != orientation.shape:
        raise DataError(path, f"truth has shape {shape} but the volumes have {orientation.shape} ({reference.name})")
    _check_affine(img, path, orientation, reference)
    data = _data(img, path).reshape(shape)
    values = np.unique(data)
    if not np.all((values == 0) | (values == 1)):
        shown = ", ".join(f"{v:g}" for v in values[:8]) + (", ..." if len(values) > 8 else "")
        raise DataError(path, f"truth is not binary: values {{{shown}}}, expected only 0 and 1 (binarise a "
                              "multi-label segmentation first, e.g. label > 0 for the whole tumour)")
    return orientation.to_slices(data > 0.5)


def _check_affine(img: Any, path: Path, orientation: Orientation, reference: Path) -> None:
    affine = np.asarray(img.affine, np.float64)
    if not np.allclose(affine, orientation.affine, rtol=0.0, atol=AFFINE_ATOL):
        delta = np.abs(affine - orientation.affine)
        row, col = np.unravel_index(int(np.argmax(delta)), delta.shape)
        # one line (predict lists failures one per line): the largest difference locates the problem well enough
        raise DataError(path, f"affine differs from {reference.name}'s by up to {delta.max():.4g} (tolerance "
                              f"{AFFINE_ATOL}): the volumes are not co-registered on the same grid (element "
                              f"[{row}, {col}]: {affine[row, col]:.4g} vs {orientation.affine[row, col]:.4g})")


def common_stem(paths: Iterable[Path]) -> str:
    """The longest common prefix of the files' stems, without trailing separators (`""` when none)."""
    stems = [nifti_stem(p) for p in paths]
    prefix = stems[0]
    for s in stems[1:]:
        while not s.startswith(prefix):
            prefix = prefix[:-1]
    return prefix.rstrip("_-. ")


def _where(paths: Sequence[Path]) -> Path:
    parents = {p.parent for p in paths}
    return parents.pop() if len(parents) == 1 else paths[0]


def find_roles(paths: Iterable[str | Path], *, strict: bool = True, where: Path | None = None) -> dict[str, Path]:
    """Role -> file for the NIfTI files among `paths` (see the module docstring for the name conventions).

    `strict`: a file whose name matches no role is an error (explicit lists); otherwise it is skipped (folders).
    Two files for one role are an error. T2 volumes are recognised and left out.
    """
    found: dict[str, Path] = {}
    for p in map(Path, paths):
        role = role_of(p)
        if role is None:
            if strict:
                raise DataError(p, "file name matches no role (" + _conventions() + "); or pass a mapping "
                                   '{"pre": ..., "flair": ..., "post": ...}')
            continue
        if role == SKIPPED:
            continue
        if role in found:
            raise DataError(where or p.parent, f"two {ROLE_NAMES[role]} volumes: {found[role].name} and {p.name}")
        found[role] = p
    return found


def _conventions() -> str:
    def pats(role: str) -> str:
        exact, prefixes = ROLE_PATTERNS[role]
        return "/".join([*exact, *(f"{p}*" for p in prefixes)])
    return "; ".join(f"{ROLE_NAMES[r]}: {pats(r)}" for r in (*ROLES, TRUTH))


def _single_volume(path: Path) -> bool:
    """Whether a lone input volume is read as the 4-D three-channel input: yes unless it is named for one role and is
    3-D (then the other two roles are reported missing)."""
    if role_of(path) not in ROLES or not path.is_file():
        return True
    try:
        return len(nib.load(path).shape) != 3
    except Exception:
        return True  # _load reports it


def load_case(source: str | Path | Sequence[str | Path] | Mapping[str, str | Path], *,
              truth: str | Path | None = None, patient: str | None = None,
              percentiles: tuple[float, float] = PERCENTILES) -> NiftiCase:
    """Read one patient's NIfTI input (see the module docstring) and slice it for the models.

    `source`: a folder holding the patient's NIfTI files, one 4-D file, a list of files (three role volumes or one 4-D
    volume, plus optionally a `*_seg*`/`*_mask*` truth), or a mapping {"pre", "flair", "post"[, "truth"]} -> file.
    `truth`: the truth volume, overriding any found by name. `patient`: the name (default: the folder's name, or the
    files' common prefix).
    """
    if isinstance(source, Mapping):
        roles = {str(k): Path(v) for k, v in source.items()}
        unknown = set(roles) - {*ROLES, TRUTH}
        if unknown:
            raise ValueError(f"unknown role(s) {sorted(unknown)}; expected {ROLES} and optionally {TRUTH!r}")
        files = list(roles.values())
        where = _where(files)
        default_name = common_stem(roles[r] for r in ROLES if r in roles) if roles else where.name
    else:
        if isinstance(source, (str, Path)):
            source = Path(source)
            if source.is_dir():
                files = sorted(p for p in source.iterdir() if p.is_file() and is_nifti(p))
                if not files:
                    raise DataError(source, "no NIfTI files (.nii, .nii.gz) in this folder")
                where, default_name, strict = source, source.name, False
            else:
                files, where, default_name, strict = [source], source.parent, nifti_stem(source), True
        else:
            files = [Path(p) for p in source]
            if not files:
                raise ValueError("no input files given")
            where, default_name, strict = _where(files), common_stem(files), True
        volumes = [p for p in files if role_of(p) != TRUTH]
        if len(volumes) == 1 and _single_volume(volumes[0]):
            roles = {"4d": volumes[0]}  # one volume: it must hold the three roles
            if len(files) > 1:
                roles.update(find_roles([p for p in files if p != volumes[0]], strict=strict, where=where))
        else:
            roles = find_roles(files, strict=strict, where=where)
    if truth is not None:
        roles[TRUTH] = Path(truth)
    return _read_case(roles, where, patient or default_name or where.name, percentiles)


def _read_case(roles: dict[str, Path], where: Path, patient: str,
               percentiles: tuple[float, float]) -> NiftiCase:
    channels: list[np.ndarray] = []
    ranges: dict[str, tuple[float, float]] = {}
    if "4d" in roles:
        path = roles.pop("4d")
        img = _load(path)
        shape = _spatial_ndim(img, path)
        if len(shape) != 4 or shape[3] != 3:
            got = "a 3-D volume" if len(shape) == 3 else f"shape {shape}"
            raise DataError(path, f"{got}: a single input volume must be 4-D with 3 channels on its 4th axis "
                                  "(pre-contrast, FLAIR, post-contrast), shape (X, Y, Z, 3); or give three 3-D role "
                                  "volumes (" + _conventions() + ")")
        orientation = Orientation.of(img)
        _check_in_plane(orientation, path)
        data = _data(img, path).reshape(shape)
        for c, role in enumerate(ROLES):
            u8, ranges[role] = robust_rescale(data[..., c], percentiles)
            channels.append(u8)
        reference, sources = path, {role: path for role in ROLES}
    else:
        missing = [r for r in ROLES if r not in roles]
        if missing:
            have = ", ".join(f"{ROLE_NAMES[r]}: {p.name}" for r, p in roles.items()) or "none"
            raise DataError(where, f"missing the {' and '.join(ROLE_NAMES[r] for r in missing)} volume"
                                   f"{'s' if len(missing) > 1 else ''} (found {have}; names recognised: "
                                   + _conventions() + ")")
        reference = roles["pre"]
        orientation = None
        for role in ROLES:
            img, data = _volume(roles[role])
            if orientation is None:
                orientation = Orientation.of(img)
                _check_in_plane(orientation, roles[role])
            else:
                if data.shape != orientation.shape:
                    raise DataError(roles[role], f"shape {data.shape} differs from {reference.name}'s "
                                                 f"{orientation.shape}: the volumes are not co-registered on one grid")
                _check_affine(img, roles[role], orientation, reference)
            u8, ranges[role] = robust_rescale(data, percentiles)
            channels.append(u8)
        sources = {r: roles[r] for r in ROLES}
    stack = orientation.to_slices(np.stack(channels, axis=-1))  # (D, H, W, 3)
    mask = None
    if TRUTH in roles:
        mask = _read_truth(roles[TRUTH], orientation, reference)
        sources[TRUTH] = roles[TRUTH]
    return NiftiCase(patient=patient, slices=[np.ascontiguousarray(s) for s in stack],
                     truth=None if mask is None else np.ascontiguousarray(mask), reference=reference,
                     orientation=orientation, sources=sources, intensity_range=ranges)


# ---- writing -------------------------------------------------------------------------------------------------------


def write_mask(mask_volume: np.ndarray, reference_path: str | Path, out_path: str | Path) -> Path:
    """Write a (D, H, W) mask in the sliced frame of `reference_path` as uint8 0/1 NIfTI on the reference's grid.

    The reference's affine and header are kept (its data type, scaling and intent become those of a uint8 mask), and
    the canonical reorientation and display layout are undone, so the mask overlays the reference voxel-for-voxel.
    """
    reference_path, out_path = Path(reference_path), Path(out_path)
    if not is_nifti(out_path):
        raise ValueError(f"{out_path}: the mask is written as NIfTI; name it .nii.gz (or .nii)")
    ref = _load(reference_path)
    _spatial_ndim(ref, reference_path)
    orientation = Orientation.of(ref)
    mask = np.asarray(mask_volume)
    if mask.shape != orientation.sliced_shape:
        raise ValueError(f"mask volume has shape {mask.shape}; {reference_path.name} slices to "
                         f"{orientation.sliced_shape} (D, H, W)")
    data = np.ascontiguousarray(orientation.from_slices(mask.astype(bool)).astype(np.uint8))
    header = ref.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(1.0, 0.0)
    header.set_intent("none")
    header["cal_min"], header["cal_max"] = 0, 1
    # affine=None: the header's qform and sform (values and codes) are written as they are, so the mask's affine is the
    # reference's by construction; shape (and dim[0] of a 4-D reference) follow the data
    out = type(ref)(data, None, header=header)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(out, out_path)
    return out_path

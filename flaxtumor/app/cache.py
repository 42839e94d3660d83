"""Per-request analyses, kept so that the live controls re-render without running the classifier again.

An analysis is what the models said about one upload: per patient the classifier's tumour probabilities and the
segmenter's ungated masks (at the pipeline's mask threshold), plus what rendering needs and the models do not change:
the brain masks, the uploaded truth, display thumbnails, the single slice's Grad-CAM, and a NIfTI reference for writing
the mask back. Threshold and post-processing then only re-run `operating_point.gate_and_postprocess` on these raw
outputs (`FinalMasks`), and opacity and toggles only re-draw the thumbnails.

The segmenter need not have run on every slice: where the classifier's gate empties a mask anyway, it is left
unsegmented (`segmented`), and the slices stay readable (`Analysis.images`) until a later operating point needs them
(`Analysis.add_masks`).

Bounded like the rest of the app's state (`flaxtumor.app.state`): arrays live on disk under the private root (masks
bit-packed, thumbnails at most `THUMBNAIL_SIDE` px), memory holds only names and probabilities; entries expire after
`ttl_s`, and beyond `capacity` entries or `max_bytes` of files the oldest go first. Sessions hold only the token.
"""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from flaxtumor.app.state import private_dir
from flaxtumor.operating_point import OperatingPoint, gate_and_postprocess

ANALYSIS_TTL_S = 3600.0  # like Gradio's cached outputs
ANALYSIS_CAPACITY = 32  # analyses kept at once (beyond it the oldest is dropped)
ANALYSIS_MAX_BYTES = 512 * 2**20  # files on disk, all analyses together
THUMBNAIL_SIDE = 512  # px: the viewers show 384 px
FINAL_MASKS_MAX_BYTES = 64 * 2**20  # the re-render memo, bit-packed


class Expired(LookupError):
    """The analysis behind a token is gone (expired, dropped for capacity, or its session ended)."""


@dataclass(frozen=True)
class Volume:
    """One patient of an analysis, as kept in memory; its arrays stay on disk."""

    patient: str
    names: tuple[str, ...]  # display names, in slice order
    shape: tuple[int, int]  # (H, W) of every slice
    probabilities: tuple[float, ...]
    truth: tuple[bool, ...] | None = None  # per slice: a true mask was uploaded; None: no truth at all
    warnings: tuple[str, ...] = ()  # per slice ("" for none)
    nifti: bool = False  # the mask can be written back as NIfTI (a reference header is stored)


@dataclass(frozen=True)
class NewVolume:
    """What `AnalysisStore.put` stores for one patient."""

    volume: Volume
    images: Sequence[np.ndarray]  # uint8 (H, W, 3)
    raw: np.ndarray  # bool (N, H, W): the segmenter's ungated masks (empty where it did not run)
    brain: np.ndarray  # bool (N, H, W)
    truth: np.ndarray | None = None  # bool (N, H, W); empty where `volume.truth` is False
    heat: Sequence[np.ndarray] | None = None  # uint8 (H, W, 3) Grad-CAM overlays (single slices)
    write_reference: Callable[[Path], Any] | None = None  # writes the NIfTI reference to the path it is given
    segmented: np.ndarray | None = None  # bool (N,): the slices the segmenter ran on; None: every slice


def _save_atomically(path: Path, array: np.ndarray) -> None:
    aside = path.with_name(f".{path.name}")
    np.save(aside, np.ascontiguousarray(array), allow_pickle=False)
    aside.replace(path)


def _pack(masks: np.ndarray) -> np.ndarray:
    masks = np.asarray(masks, bool)
    return np.packbits(masks.reshape(len(masks), -1), axis=1)


def _unpack(packed: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    return np.unpackbits(packed, axis=1, count=h * w).reshape(len(packed), h, w).astype(bool)


@dataclass(frozen=True)
class Analysis:
    """A stored analysis: its patients, and readers for their arrays (OSError once the entry is released)."""

    token: str
    kind: str  # "slice" or "patient"
    folder: Path
    volumes: tuple[Volume, ...]

    @property
    def count(self) -> int:
        return sum(len(v.names) for v in self.volumes)

    def locate(self, index: int) -> tuple[int, int]:
        """(volume, slice within it) of the 0-based slice `index` over all patients, clipped to the analysis."""
        index = int(np.clip(index, 0, self.count - 1))
        for k, v in enumerate(self.volumes):
            if index < len(v.names):
                return k, index
            index -= len(v.names)
        raise AssertionError("unreachable")

    def _masks(self, k: int, what: str) -> np.ndarray:
        return _unpack(np.load(self.folder / f"{k}_{what}.npy", allow_pickle=False), self.volumes[k].shape)

    def raw(self, k: int) -> np.ndarray:
        return self._masks(k, "raw")

    def segmented(self, k: int) -> np.ndarray:
        """(N,) bool: the slices whose raw mask the segmenter has drawn (the others are empty, not yet needed)."""
        path = self.folder / f"{k}_segmented.npy"
        return np.load(path, allow_pickle=False) if path.exists() else np.ones(len(self.volumes[k].names), bool)

    def images(self, k: int) -> np.ndarray:
        """uint8 (N, H, W, 3): the uploaded slices, kept while some are unsegmented (the thumbnails, when the
        slices are no larger than them)."""
        path = self.folder / f"{k}_images.npy"
        return np.load(path if path.exists() else self.folder / f"{k}_thumbs.npy", allow_pickle=False)

    def add_masks(self, k: int, selected: np.ndarray, masks: np.ndarray) -> None:
        """Stores the segmenter's masks of the `selected` ((N,) bool) slices, until now unsegmented. Each file is
        replaced whole (written aside, then renamed), so a reader sees the old or the new state; callers serialise
        the writers (`App`). OSError once the entry is released."""
        raw = self.raw(k)
        raw[selected] = masks
        _save_atomically(self.folder / f"{k}_raw.npy", _pack(raw))
        _save_atomically(self.folder / f"{k}_segmented.npy", self.segmented(k) | selected)

    def brain(self, k: int) -> np.ndarray:
        return self._masks(k, "brain")

    def truth(self, k: int) -> np.ndarray | None:
        return None if self.volumes[k].truth is None else self._masks(k, "truth")

    def thumbnail(self, k: int, i: int) -> np.ndarray:
        return np.array(np.load(self.folder / f"{k}_thumbs.npy", mmap_mode="r", allow_pickle=False)[i])

    def heat(self, k: int, i: int) -> np.ndarray | None:
        path = self.folder / f"{k}_heat.npy"
        return np.array(np.load(path, mmap_mode="r", allow_pickle=False)[i]) if path.exists() else None

    def reference(self, k: int) -> Path | None:
        return self.folder / f"{k}_reference.nii.gz" if self.volumes[k].nifti else None


@dataclass
class _Entry:
    analysis: Analysis
    nbytes: int
    created: float


class AnalysisStore:
    """Analyses by token, on disk under the private root, with a time to live, a capacity and a byte cap."""

    def __init__(self, ttl_s: float = ANALYSIS_TTL_S, capacity: int = ANALYSIS_CAPACITY,
                 max_bytes: int = ANALYSIS_MAX_BYTES, side: int = THUMBNAIL_SIDE, root: Path | None = None):
        self.root = root or private_dir("analyses-")
        self.ttl_s, self.capacity, self.max_bytes, self.side = ttl_s, capacity, max_bytes, side
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, kind: str, volumes: Sequence[NewVolume]) -> str:
        token = uuid.uuid4().hex
        folder = self.root / token
        folder.mkdir()
        nbytes = 0
        try:
            for k, new in enumerate(volumes):
                nbytes += self._save_volume(folder, k, new)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        analysis = Analysis(token, kind, folder, tuple(new.volume for new in volumes))
        with self._lock:
            self._entries[token] = _Entry(analysis, nbytes, time.monotonic())
        self.sweep()
        return token

    def _save_volume(self, folder: Path, k: int, new: NewVolume) -> int:
        arrays = {"raw": _pack(new.raw), "brain": _pack(new.brain),
                  "thumbs": np.stack([self._thumbnail(im) for im in new.images])}
        if new.segmented is not None and not new.segmented.all():
            arrays["segmented"] = np.asarray(new.segmented, bool)
            if arrays["thumbs"].shape[1:3] != new.volume.shape:  # thumbnails smaller than the slices: keep these
                arrays["images"] = np.stack(new.images)
        if new.volume.truth is not None:
            arrays["truth"] = _pack(new.truth)
        if new.heat is not None:
            arrays["heat"] = np.stack([self._thumbnail(h) for h in new.heat])
        nbytes = 0
        for what, array in arrays.items():
            np.save(folder / f"{k}_{what}.npy", np.ascontiguousarray(array), allow_pickle=False)
            nbytes += (folder / f"{k}_{what}.npy").stat().st_size
        if new.write_reference is not None:
            new.write_reference(folder / f"{k}_reference.nii.gz")
            nbytes += (folder / f"{k}_reference.nii.gz").stat().st_size
        return nbytes

    def _thumbnail(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        if max(h, w) <= self.side:
            return image
        scale = self.side / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))

    def get(self, token: Any) -> Analysis:
        """The analysis behind `token`; `Expired` when it is unknown or too old."""
        with self._lock:
            entry = self._entries.get(token) if isinstance(token, str) else None
        if entry is None or time.monotonic() - entry.created > self.ttl_s:
            raise Expired(token)
        return entry.analysis

    def release(self, token: Any) -> None:
        with self._lock:
            entry = self._entries.pop(token, None) if isinstance(token, str) else None
        if entry is not None:
            shutil.rmtree(entry.analysis.folder, ignore_errors=True)

    def sweep(self) -> None:
        """Drops expired entries, then the oldest until within the capacity and the byte cap."""
        now = time.monotonic()
        with self._lock:
            drop = [t for t, e in self._entries.items() if now - e.created > self.ttl_s]
            kept = [t for t in self._entries if t not in drop]
            total = sum(self._entries[t].nbytes for t in kept)
            while kept and (len(kept) > self.capacity or total > self.max_bytes):
                oldest = kept.pop(0)
                total -= self._entries[oldest].nbytes
                drop.append(oldest)
            folders = [self._entries.pop(t).analysis.folder for t in drop]
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)

    def __len__(self) -> int:
        return len(self._entries)


class FinalMasks:
    """Slice calls and final masks of one patient of an analysis at an operating point, from its stored raw outputs
    through `gate_and_postprocess` (the one code path of the pipeline, evaluate and tune). A threshold change
    computes them once for the summary, table, download and viewer; browsing slices reuses them. The memo is
    bit-packed and bounded in bytes, oldest out first."""

    def __init__(self, max_bytes: int = FINAL_MASKS_MAX_BYTES):
        self.max_bytes = max_bytes
        self._memo: OrderedDict[tuple, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, analysis: Analysis, k: int, point: OperatingPoint) -> tuple[np.ndarray, np.ndarray]:
        """(calls (N,) bool, final masks (N, H, W) bool)."""
        key = (analysis.token, k, point)
        with self._lock:
            hit = self._memo.get(key)
            if hit is not None:
                self._memo.move_to_end(key)
        if hit is not None:
            return hit[0], _unpack(hit[1], analysis.volumes[k].shape)
        probabilities = np.asarray(analysis.volumes[k].probabilities, np.float32)
        calls, final = gate_and_postprocess(probabilities, analysis.raw(k), point)
        packed = _pack(final)
        with self._lock:
            self._memo[key] = (calls, packed)
            total = sum(p.nbytes for _, p in self._memo.values())
            while len(self._memo) > 1 and total > self.max_bytes:
                _, (_, dropped) = self._memo.popitem(last=False)
                total -= dropped.nbytes
        return calls, np.asarray(final, bool)

    def forget(self, token: str) -> None:
        with self._lock:
            for key in [key for key in self._memo if key[0] == token]:
                del self._memo[key]

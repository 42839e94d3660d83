"""Grain input pipeline: Slice records -> fixed-shape numpy batches for training (shuffled, augmented) and evaluation.

Per slice: decode -> resize to image_size (uint8) -> [augment, train only] -> normalise. Resize and normalise are the
two halves of `preprocess`, so an evaluation batch equals `preprocess(patient volume)` exactly.
Batch: {"image": f32 (B,S,S,3), "mask": f32 (B,S,S,1) in {0,1}, "label": f32 (B,), "valid": bool (B,)}.
Transforms are pure numpy and picklable: with num_workers > 0 they run in spawned grain processes.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, TypeVar

import grain
import numpy as np

from flaxtumor.config import DataConfig
from flaxtumor.data.augment import augment
from flaxtumor.data.io import read_image, read_mask
from flaxtumor.data.lgg import Slice
from flaxtumor.data.preprocess import Preprocessing, Stats, normalise, resize_images, resize_mask, volume_stats

_READ_THREADS = 2  # 2-core machine: more threads only contend for the GIL
_MEMO_ENTRIES = 8  # decoded slices and patient stats of the train, val and test sets of one run, plus spares
_memo: dict[tuple, object] = {}
T = TypeVar("T")


@dataclass(frozen=True)
class Decoded:
    """Slices decoded and resized once: uint8 images (N, S, S, 3) and bool masks (N, S, S)."""

    images: np.ndarray
    masks: np.ndarray


def _load(s: Slice, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Decoded, resized image and mask of one slice; a slice without a mask (unlabelled data) gets an empty one."""
    image = resize_images(read_image(s.image_path)[None], size)[0]
    if s.mask_path is None:
        return image, np.zeros((size, size), bool)
    return image, resize_mask(read_mask(s.mask_path), (size, size))


def decode_all(slices: Sequence[Slice], size: int) -> Decoded:
    """Decodes every slice once (threads: TIFF inflate and PIL resize release the GIL)."""
    with ThreadPoolExecutor(_READ_THREADS) as pool:
        pairs = list(pool.map(lambda s: _load(s, size), slices))
    return Decoded(np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]))


def _memoised(kind: str, slices: Sequence[Slice], size: int, build: Callable[[], T]) -> T:
    """Built once per (kind, image size, slice list): CPU training re-reads the same slices every epoch."""
    key = (kind, size, tuple(s.image_path for s in slices))
    if key not in _memo:
        while len(_memo) >= _MEMO_ENTRIES:
            _memo.pop(next(iter(_memo)))
        _memo[key] = build()
    return _memo[key]


def patient_stats(slices: Sequence[Slice], decoded: Decoded) -> dict[str, Stats]:
    """volume_zscore statistics per patient over its given slices (so pass whole patients)."""
    ids = np.array([s.patient_id for s in slices])
    return {pid: volume_stats(decoded.images[ids == pid]) for pid in dict.fromkeys(ids)}


@dataclass(frozen=True)
class _SliceSource:
    """A grain random-access source over the records, reading from the decoded cache when there is one."""

    slices: tuple[Slice, ...]
    size: int
    decoded: Decoded | None

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, i: int) -> tuple[Slice, np.ndarray, np.ndarray]:
        s = self.slices[i]
        if self.decoded is not None:
            return s, self.decoded.images[i], self.decoded.masks[i]
        return (s, *_load(s, self.size))


@dataclass(frozen=True)
class _ToExample:
    """(position, decoded slice) -> example dict; augmentation rng from (seed, epoch, position) when training."""

    cfg: DataConfig
    stats: dict[str, Stats] | None
    seed: int = 0
    epoch: int = 0
    train: bool = False

    def __call__(self, position: int, item: tuple[Slice, np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
        s, image, mask = item
        image = image.astype(np.float32)
        mask = mask[..., None].astype(np.float32)
        if self.train and self.cfg.augment:
            rng = np.random.default_rng([self.seed, self.epoch, position])
            image, mask = augment(image, mask, rng, self.cfg)
        spec = Preprocessing(self.cfg.image_size, self.cfg.normalisation)
        stats = self.stats[s.patient_id] if self.stats is not None else None
        return {
            "image": normalise(image[None], spec, stats)[0],
            "mask": mask,
            "label": np.float32(s.has_tumour),
            "valid": np.bool_(True),
        }


def _dataset(slices: Sequence[Slice], cfg: DataConfig) -> tuple[grain.MapDataset, dict[str, Stats] | None]:
    slices = tuple(slices)
    if not slices:
        raise ValueError("no slices to batch")
    size = cfg.image_size
    decoded = _memoised("decoded", slices, size, lambda: decode_all(slices, size)) if cfg.cache_decoded else None
    stats = None
    if cfg.normalisation == "volume_zscore":
        stats = _memoised("stats", slices, size, lambda: patient_stats(slices, decoded or decode_all(slices, size)))
    return grain.MapDataset.source(_SliceSource(slices, cfg.image_size, decoded)), stats


def _iterate(ds: grain.MapDataset, cfg: DataConfig) -> Iterator[dict[str, np.ndarray]]:
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=_READ_THREADS, prefetch_buffer_size=2))
    if cfg.num_workers <= 0:
        yield from it_ds
        return
    # grain 0.2.18: spawned workers read absl flags and crash unless they count as parsed.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    it = iter(it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers, per_worker_buffer_size=2)))
    try:
        for batch in it:
            # Plain copies: batches from workers live in shared memory, which leaks if a consumer keeps them past exit.
            yield {k: np.array(v) for k, v in batch.items()}
    finally:
        it.close()


def steps_per_epoch(n_slices: int, batch_size: int) -> int:
    return n_slices // batch_size


def train_batches(
    slices: Sequence[Slice], cfg: DataConfig, batch_size: int, seed: int, epoch: int, start_step: int = 0
) -> Iterator[dict[str, np.ndarray]]:
    """One epoch of shuffled, augmented batches (drop_remainder). The order and augmentation depend only on
    (seed, epoch), not on num_workers; `start_step` resumes at exactly that batch of the epoch."""
    steps = steps_per_epoch(len(slices), batch_size)
    if steps == 0:
        raise ValueError(f"{len(slices)} training slices cannot fill one batch of {batch_size}")
    if not 0 <= start_step <= steps:
        raise ValueError(f"start_step {start_step} is outside the epoch's {steps} steps")
    source, stats = _dataset(slices, cfg)
    shuffle_seed = int(np.random.default_rng([seed, epoch]).integers(2**31))
    ds = (
        source.shuffle(seed=shuffle_seed)
        .map_with_index(_ToExample(cfg, stats, seed, epoch, train=True))
        .batch(batch_size, drop_remainder=True)
    )
    return _iterate(ds[start_step:], cfg)


def eval_batches(slices: Sequence[Slice], cfg: DataConfig, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Every slice once, in order, no augmentation; the last batch is padded to batch_size with valid=False."""
    source, stats = _dataset(slices, cfg)
    ds = source.map_with_index(_ToExample(cfg, stats)).batch(batch_size)
    for batch in _iterate(ds, cfg):
        short = batch_size - len(batch["valid"])
        if short:
            batch = {k: np.concatenate([v, np.zeros((short, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}
        yield batch

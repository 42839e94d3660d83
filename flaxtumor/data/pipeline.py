"""Grain input pipeline: Slice records -> fixed-shape numpy batches for training (shuffled, augmented) and evaluation.

Per slice: decode -> its patient's grey background made black -> [crop to its patient's box, `DataConfig.crop`
"brain"] -> resize to image_size (uint8) ->
[stack with its neighbours, `DataConfig.context_slices` K > 0] -> [augment, train only] -> [missing sequences, train
only, `DataConfig.missing_sequences` > 0] -> normalise -> [a patch, train only, `DataConfig.train_patch` P > 0:
batches of (B,P,P,C)]. Background, crop, resize, normalise and the context are `preprocess`'s steps, with the
background and box that `grey_background` and `crop_box` give the patient's whole volume (`patient_readings`) and the
neighbours `stack_context` picks from its slices in slice_index order, so an evaluation batch equals
`preprocess(patient volume)`. A neighbour is another decoded slice of the same patient, from the
same cache; the sampler draws centre slices, and the mask, label and index are the centre slice's.
Batch: {"image": f32 (B,S,S,C) (C = 3(2K+1)), "mask": f32 (B,S,S,1) in {0,1}, "label": f32 (B,), "valid": bool (B,),
"index": int32 (B,)}: `index` is each row's position in the given slice list (-1 on padding), so a consumer can tell
which slices (and patients) reached it.
Transforms are pure numpy and picklable: with num_workers > 0 they run in spawned grain processes.

Multi-host: with `shard_index`/`shard_count` (jax.process_index()/process_count()) each process reads, decodes and
augments only its rows of every global batch: shard i of step t holds rows [i*b, (i+1)*b) of the single-process batch t
(b = batch_size // shard_count), with the same shuffle and the same per-example augmentation, so the shards concatenated
in shard order are that batch exactly (grain's `ds[shard_index::shard_count]` over sub-batches of b rows).

Sampling (`DataConfig.sampling`): "all" visits every slice once per epoch in a shuffled order; "tumour" draws
`epoch_length` slices with replacement, with probability (1 - u) * area / sum(area) + u / N (tumour pixels per slice, u
= sampling_uniform_share), after Buda et al. 2019. Either way the epoch's order is a function of (seed, epoch) alone.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence, TypeVar

import grain
import numpy as np

from flaxtumor.config import DataConfig
from flaxtumor.data.augment import augment, drop_sequences, patch_window
from flaxtumor.data.io import read_image, read_mask
from flaxtumor.data.lgg import Slice
from flaxtumor.data.preprocess import (
    FLAIR, Background, Box, Preprocessing, Stats, crop, crop_box, grey_background, normalise, remove_grey_background,
    MASK_TARGET_DTYPES, mask_targets, resize_images, stack_context, volume_stats,
)

_READ_THREADS = 2  # 2-core machine: more threads only contend for the GIL
_MEMO_ENTRIES = 12  # decoded slices, stats and readings of the train, val and test sets of one run, plus spares
_memo: dict[tuple, object] = {}
T = TypeVar("T")


@dataclass(frozen=True)
class Decoded:
    """Slices decoded and resized once: uint8 images (N, S, S, 3) and masks (N, S, S): bool, or float16 coverage
    with data.mask_resize "area" (`mask_targets`)."""

    images: np.ndarray
    masks: np.ndarray


class Reading(NamedTuple):
    """How one slice is read: its patient's grey background (`grey_background`) and, with the brain crop, its
    patient's box (None: no crop)."""

    background: Background = ()
    box: Box | None = None


Readings = tuple[Reading, ...]  # one per slice


def _load(s: Slice, size: int, reading: Reading = Reading(), mask_resize: str = "nearest"
          ) -> tuple[np.ndarray, np.ndarray]:
    """Decoded, repaired (its patient's grey background), cropped (its patient's box, when given), resized image and
    mask of one slice (the mask as `mask_targets` makes it); a slice without a mask (unlabelled data) gets an empty
    one. Image and mask are cut alike."""
    box = reading.box
    image = remove_grey_background(read_image(s.image_path)[None], reading.background)
    image = resize_images(crop(image, box) if box else image, size)[0]
    if s.mask_path is None:
        return image, mask_targets(np.zeros((size, size), bool), (size, size), mask_resize)
    mask = read_mask(s.mask_path)
    return image, mask_targets(mask[box.rows, box.cols] if box else mask, (size, size), mask_resize)


def _load_many(slices: Sequence[Slice], size: int, readings: Readings, mask_resize: str = "nearest"
               ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Decodes slices on threads (TIFF inflate and PIL resize release the GIL); `readings[i]` says how `slices[i]`
    is read."""
    with ThreadPoolExecutor(_READ_THREADS) as pool:
        return list(pool.map(lambda i: _load(slices[i], size, readings[i], mask_resize), range(len(slices))))


def decode_all(slices: Sequence[Slice], size: int, crop_mode: str = "none", mask_resize: str = "nearest") -> Decoded:
    """Decodes every slice once, as training reads it (pass whole patients)."""
    pairs = _load_many(slices, size, patient_readings(slices, crop_mode), mask_resize)
    return Decoded(np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]))


def patient_readings(slices: Sequence[Slice], crop_mode: str = "none") -> Readings:
    """Each slice's `Reading`: its patient's grey background and (crop_mode "brain") crop box, each decided once over
    the patient's given slices (so pass whole patients), so a patient's slices are read alike and stay aligned. Reads
    each image once per slice list."""

    def build() -> Readings:
        rows: dict[str, list[int]] = {}
        for i, s in enumerate(slices):
            rows.setdefault(s.patient_id, []).append(i)
        readings: list[Reading] = [Reading()] * len(slices)
        with ThreadPoolExecutor(_READ_THREADS) as pool:
            for indices in rows.values():
                volume = list(pool.map(lambda i: read_image(slices[i].image_path), indices))
                reading = Reading(grey_background(volume), crop_box(volume, "brain") if crop_mode == "brain" else None)
                for i in indices:
                    readings[i] = reading
        return tuple(readings)

    return _memoised(f"readings-{crop_mode}", slices, 0, build)


class _DecodedCache:
    """Decoded, resized slices kept for the run, filled on demand: a process decodes only the slices its shard of the
    batches reads (arrays from np.zeros take memory only where written)."""

    def __init__(self, slices: Sequence[Slice], size: int, readings: Readings, mask_resize: str = "nearest"):
        self.slices = tuple(slices)
        self.size = size
        self.readings = readings
        self.mask_resize = mask_resize
        self.images = np.zeros((len(self.slices), size, size, 3), np.uint8)
        self.masks = np.zeros((len(self.slices), size, size), MASK_TARGET_DTYPES[mask_resize])
        self.filled = np.zeros(len(self.slices), bool)

    def fill(self, indices: Iterable[int]) -> None:
        """Decodes the given slices that are not cached yet."""
        missing = [i for i in dict.fromkeys(int(i) for i in indices) if not self.filled[i]]
        readings = [self.readings[i] for i in missing]
        pairs = _load_many([self.slices[i] for i in missing], self.size, readings, self.mask_resize)
        for i, (image, mask) in zip(missing, pairs):
            self.images[i], self.masks[i] = image, mask
            self.filled[i] = True

    def all(self) -> Decoded:
        self.fill(range(len(self.slices)))
        return Decoded(self.images, self.masks)


def context_rows(slices: Sequence[Slice], k: int) -> np.ndarray:
    """int (N, 2k+1): the positions in `slices` of each slice's context, slices i-k..i+k of its patient ordered by
    slice_index (`stack_context`'s rule, so the nearest slice repeats at the volume's ends). Pass whole patients."""
    rows = np.empty((len(slices), 2 * k + 1), np.int64)
    by_patient: dict[str, list[int]] = {}
    for i, s in enumerate(slices):
        by_patient.setdefault(s.patient_id, []).append(i)
    for positions in by_patient.values():
        ordered = np.array(sorted(positions, key=lambda i: slices[i].slice_index))
        rows[ordered] = stack_context(ordered[:, None], k)
    return rows


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
    decoded: _DecodedCache | None
    readings: Readings
    context: np.ndarray | None = None  # (N, 2K+1) `context_rows`; None: each slice alone
    mask_resize: str = "nearest"

    def __len__(self) -> int:
        return len(self.slices)

    def reads(self, indices: Iterable[int]) -> Iterator[int]:
        """The slices that the examples at `indices` are made of: each one, or its context rows."""
        for i in indices:
            yield from ([i] if self.context is None else self.context[i])

    def __getitem__(self, i: int) -> tuple[int, Slice, np.ndarray, np.ndarray]:
        """(i, centre slice, uint8 image (S, S, 3) or its context stack (S, S, 3(2K+1)), the centre's mask)."""
        s, rows = self.slices[i], list(self.reads([i]))
        if self.decoded is None:
            pairs = {j: _load(self.slices[j], self.size, self.readings[j], self.mask_resize) for j in rows}
            return i, s, np.concatenate([pairs[j][0] for j in rows], axis=-1), pairs[i][1]
        if not self.decoded.filled[rows].all():  # the pipelines pre-fill what they read; this is only a fallback
            self.decoded.fill(rows)
        image = self.decoded.images[i] if self.context is None else np.concatenate(self.decoded.images[rows], axis=-1)
        return i, s, image, self.decoded.masks[i]


@dataclass(frozen=True)
class _ToExample:
    """(position, decoded slice) -> example dict; augmentation rng from (seed, epoch, position) when training."""

    cfg: DataConfig
    stats: dict[str, Stats] | None
    seed: int = 0
    epoch: int = 0
    train: bool = False

    def __call__(self, position: int, item: tuple[int, Slice, np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
        index, s, image, mask = item
        image = image.astype(np.float32)
        mask = mask[..., None].astype(np.float32)
        if self.train and self.cfg.augment:
            rng = np.random.default_rng([self.seed, self.epoch, position])
            image, mask = augment(image, mask, rng, self.cfg)
        spec = Preprocessing.from_config(self.cfg)
        stats = self.stats[s.patient_id] if self.stats is not None else None
        if self.train and self.cfg.augment and self.cfg.missing_sequences:
            rng = np.random.default_rng([self.seed, self.epoch, position, 2])
            image, dropped = drop_sequences(image, self.cfg.missing_sequences, rng)
            if dropped and stats is not None:  # a filled sequence's volume statistics are FLAIR's, as at inference
                mean, std = (v.copy() for v in stats)
                mean[list(dropped)], std[list(dropped)] = mean[FLAIR], std[FLAIR]
                stats = (mean, std)
        image = normalise(image[None], spec, stats)[0]  # the whole slice's statistics, as inference sees them
        if self.train and (size := self.cfg.train_patch):
            rng = np.random.default_rng([self.seed, self.epoch, position, 1])
            top, left = patch_window(mask, size, rng)
            image, mask = image[top:top + size, left:left + size], mask[top:top + size, left:left + size]
        return {
            "image": image,
            "mask": mask,
            "label": np.float32(s.has_tumour),
            "valid": np.bool_(True),
            "index": np.int32(index),
        }


def _source(slices: Sequence[Slice], cfg: DataConfig) -> tuple[_SliceSource, dict[str, Stats] | None]:
    slices = tuple(slices)
    if not slices:
        raise ValueError("no slices to batch")
    size = cfg.image_size
    readings = patient_readings(slices, cfg.crop)
    kind = "" if cfg.crop == "none" else f"-{cfg.crop}"  # cropped and uncropped decodings never share an entry
    targets = f"{kind}-{cfg.mask_resize}"  # nor do binary and coverage masks
    cache = (_memoised(f"decoded{targets}", slices, size,
                       lambda: _DecodedCache(slices, size, readings, cfg.mask_resize))
             if cfg.cache_decoded else None)
    stats = None
    if cfg.normalisation == "volume_zscore":  # whole patient volumes, so every slice (once per run, memoised)
        stats = _memoised(f"stats{kind}", slices, size,
                          lambda: patient_stats(slices, cache.all() if cache else decode_all(slices, size, cfg.crop)))
    context = context_rows(slices, cfg.context_slices) if cfg.context_slices else None
    return _SliceSource(slices, size, cache, readings, context, cfg.mask_resize), stats


def _check_shard(batch_size: int, shard_index: int, shard_count: int) -> int:
    """The rows per shard of each global batch."""
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} is outside the {shard_count} shard(s)")
    if batch_size % shard_count:
        raise ValueError(f"batch size {batch_size} does not divide into {shard_count} shards")
    return batch_size // shard_count


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


def tumour_areas(slices: Sequence[Slice]) -> np.ndarray:
    """Tumour pixels per slice at full resolution (int64); only slices with tumour are read, once per slice list."""

    def build() -> np.ndarray:
        areas = np.zeros(len(slices), np.int64)
        wanted = [i for i, s in enumerate(slices) if s.has_tumour and s.mask_path is not None]
        with ThreadPoolExecutor(_READ_THREADS) as pool:
            counts = pool.map(lambda i: int(read_mask(slices[i].mask_path).sum()), wanted)
            for i, count in zip(wanted, counts):
                areas[i] = count
        return areas

    return _memoised("areas", slices, 0, build)


def _check_sampling(cfg: DataConfig) -> None:
    if cfg.sampling not in ("all", "tumour"):
        raise ValueError(f"sampling must be 'all' or 'tumour', got {cfg.sampling!r}")
    if not 0.0 <= cfg.sampling_uniform_share <= 1.0:
        raise ValueError(f"sampling_uniform_share must be in [0, 1], got {cfg.sampling_uniform_share}")
    if cfg.samples_per_epoch < 0:
        raise ValueError(f"samples_per_epoch must be >= 0, got {cfg.samples_per_epoch}")


def sampling_probabilities(slices: Sequence[Slice], cfg: DataConfig) -> np.ndarray:
    """p = (1 - u) * area / sum(area) + u / N per slice (u = cfg.sampling_uniform_share); uniform without tumour."""
    _check_sampling(cfg)
    areas = tumour_areas(slices).astype(np.float64)
    n, u = len(slices), cfg.sampling_uniform_share
    if areas.sum() == 0:
        return np.full(n, 1.0 / n)
    p = (1.0 - u) * areas / areas.sum() + u / n
    return p / p.sum()


def epoch_length(slices: Sequence[Slice], cfg: DataConfig) -> int:
    """Examples per training epoch: every slice ("all"), or cfg.samples_per_epoch draws ("tumour"; 0 = twice the
    tumour slices, so an epoch sees each tumour slice about twice as often as "all" would, at well under its cost)."""
    _check_sampling(cfg)
    if cfg.sampling == "all":
        return len(slices)
    if cfg.samples_per_epoch:
        return cfg.samples_per_epoch
    return 2 * sum(s.has_tumour for s in slices) or len(slices)


def epoch_order(slices: Sequence[Slice], cfg: DataConfig, seed: int, epoch: int) -> grain.MapDataset:
    """Position in the epoch -> slice index, from (seed, epoch) alone (so a resumed or sharded run draws the same)."""
    if cfg.sampling == "all":
        shuffle_seed = int(np.random.default_rng([seed, epoch]).integers(2**31))
        return grain.MapDataset.range(len(slices)).shuffle(seed=shuffle_seed)
    p = sampling_probabilities(slices, cfg)
    # Its own stream: the "all" shuffle and the augmentation draw from [seed, epoch(, position)].
    picks = np.random.default_rng([seed, epoch, 0x5A3]).choice(len(slices), size=epoch_length(slices, cfg), p=p)
    return grain.MapDataset.source([int(i) for i in picks])


def train_batches(
    slices: Sequence[Slice],
    cfg: DataConfig,
    batch_size: int,
    seed: int,
    epoch: int,
    start_step: int = 0,
    shard_index: int = 0,
    shard_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """One epoch of shuffled (or sampled, see `epoch_order`), augmented batches (drop_remainder). The order and
    augmentation depend only on (seed, epoch), not on num_workers or the sharding; `start_step` resumes at exactly that
    batch of the epoch.

    `batch_size` is the global batch; shard `shard_index` of `shard_count` gets batches of batch_size // shard_count
    rows (its block of each global batch) and reads and decodes only the slices of those rows."""
    steps = steps_per_epoch(epoch_length(slices, cfg), batch_size)
    if steps == 0:
        raise ValueError(f"{epoch_length(slices, cfg)} training examples cannot fill one batch of {batch_size}")
    if not 0 <= start_step <= steps:
        raise ValueError(f"start_step {start_step} is outside the epoch's {steps} steps")
    rows = _check_shard(batch_size, shard_index, shard_count)
    source, stats = _source(slices, cfg)
    order = epoch_order(source.slices, cfg, seed, epoch)
    if source.decoded is not None:  # decode this shard's slices for the rest of the epoch up front, on threads
        source.decoded.fill(source.reads(
            order[t * batch_size + shard_index * rows + r] for t in range(start_step, steps) for r in range(rows)
        ))
    # Augmentation is seeded by the position in the epoch's global order (map_with_index before any slicing), so a
    # row gets the same randomness whichever shard reads it. Sub-batch k of `rows` rows is shard k % shard_count of
    # step k // shard_count; the slicing is lazy, so other shards' rows are never read.
    ds = (
        order.map(source.__getitem__)
        .map_with_index(_ToExample(cfg, stats, seed, epoch, train=True))[: steps * batch_size]
        .batch(rows, drop_remainder=True)[shard_index::shard_count]
    )
    return _iterate(ds[start_step:], cfg)


def _padding(n: int, size: int, channels: int) -> dict[str, np.ndarray]:
    """n rows of an eval batch that stand for no slice (valid=False, zeros)."""
    return {
        "image": np.zeros((n, size, size, channels), np.float32),
        "mask": np.zeros((n, size, size, 1), np.float32),
        "label": np.zeros((n,), np.float32),
        "valid": np.zeros((n,), bool),
        "index": np.full((n,), -1, np.int32),
    }


def eval_batches(
    slices: Sequence[Slice], cfg: DataConfig, batch_size: int, shard_index: int = 0, shard_count: int = 1
) -> Iterator[dict[str, np.ndarray]]:
    """Every slice once, in order, no augmentation; the last batch is padded to batch_size with valid=False.

    Sharded, each shard yields its block of batch_size // shard_count rows of each padded global batch (so every
    shard yields the same number of batches, some possibly all padding) and reads only the slices of those rows."""
    rows = _check_shard(batch_size, shard_index, shard_count)
    source, stats = _source(slices, cfg)
    n = len(source)
    steps = -(-n // batch_size)
    mine = range(shard_index, -(-n // rows), shard_count)  # this shard's sub-batches of `rows` that hold slices
    if source.decoded is not None:
        source.decoded.fill(source.reads(i for k in mine for i in range(k * rows, min((k + 1) * rows, n))))
    yielded, channels = 0, Preprocessing.from_config(cfg).channels
    if len(mine):
        ds = grain.MapDataset.source(source).map_with_index(_ToExample(cfg, stats)).batch(rows)
        ds = ds[shard_index::shard_count]
        for batch in _iterate(ds, cfg):
            short = rows - len(batch["valid"])
            if short:
                pad = _padding(short, cfg.image_size, channels)
                batch = {k: np.concatenate([v, pad[k]]) for k, v in batch.items()}
            yielded += 1
            yield batch
    for _ in range(steps - yielded):
        yield _padding(rows, cfg.image_size, channels)

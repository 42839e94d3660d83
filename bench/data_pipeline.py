"""Input-pipeline throughput: decoded + augmented training images per second, beside the training step rate.

    python bench/data_pipeline.py [--data ROOT|synthetic] [--slices 192] [--sizes 256 128] [--workers 0 1 2]

For each image size and worker count, one epoch of `train_batches` over the first `--slices` slices, read from disk
(TIFF decode + resize every epoch) and from the in-memory decoded cache (decode once, then augment only). "startup" is
the time to the first batch (worker spawn, cache build); "img/s" counts the batches after it. "train img/s" is the
loop's real train step (ResUNet, the default segmenter) measured in the same run at the same size and batch
(`--train-task cls` for the ResNet50 classifier): the pipeline must outrun it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

from flaxtumor.config import DataConfig
from flaxtumor.data import lgg, pipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import jax_step  # noqa: E402  (the same set-up as bench/train_step.py)


def train_rate(task: str, batch: int, size: int, steps: int = 3) -> float:
    """Images/s of the loop's real train step, after a compiling warm-up step."""
    step = jax_step(task, batch, size, "fp32")
    step(), step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - start)


def _default_root() -> str:
    shared = Path(__file__).resolve().parents[2] / "shared" / "lgg" / "kaggle_3m"
    real = Path(os.environ.get("FLAXTUMOR_LGG_ROOT", shared))
    return str(real) if real.is_dir() else "synthetic"


def _epoch(slices: list, cfg: DataConfig, batch_size: int) -> tuple[float, float]:
    """(seconds to the first batch, images per second after it)."""
    start = time.perf_counter()
    batches = pipeline.train_batches(slices, cfg, batch_size, seed=0, epoch=0)
    next(batches)
    first = time.perf_counter()
    n = sum(len(b["valid"]) for b in batches)
    return first - start, n / max(time.perf_counter() - first, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=_default_root())
    parser.add_argument("--slices", type=int, default=192)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 128])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--train-task", choices=("seg", "cls"), default="seg")
    args = parser.parse_args()

    patients = lgg.load_dataset(DataConfig(root=args.data))
    slices = [s for p in patients for s in p.slices][: args.slices]
    print(f"data: {args.data} ({len(slices)} slices), batch {args.batch_size}, cpu cores: {os.cpu_count()}")
    header = ("size", "source", "workers", "startup s", "img/s", "train img/s", "pipeline/train")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (5, 7, 7, 9, 7, 11, 14))))
    for size in args.sizes:
        train = train_rate(args.train_task, args.batch_size, size)
        base = DataConfig(root=args.data, image_size=size, augment=True)
        for cached in (False, True):
            if cached:
                pipeline._memo.clear()  # time the cache build as part of the first startup
            for workers in args.workers:
                cfg = dataclasses.replace(base, cache_decoded=cached, num_workers=workers)
                startup, rate = _epoch(slices, cfg, args.batch_size)
                print(
                    f"{size:>5} {'memory' if cached else 'disk':>7} {workers:>7} {startup:>9.2f} {rate:>7.1f} "
                    f"{train:>11.1f} {rate / train:>13.1f}x"
                )


if __name__ == "__main__":
    main()

"""Training-step throughput (images/s) of the real train step, both tasks, JAX vs PyTorch 2.13 in the same run.

    python bench/train_step.py                       # cls + seg at 256x256, batch 8, fp32 (bf16 too on a GPU)
    python bench/train_step.py --tasks seg --batch 4 --iters 2

JAX runs `flaxtumor.train.loop.make_train_step`: the training loss, clipping + AdamW, the batch sharded over all
devices, donated state. PyTorch runs the same architectures (tests/models/torch_reference.py) with the same loss and
optimizer. The classifier trains whole (random init, as without --backbone-weights). On a shared CPU compare the
printed ratios, not absolute numbers.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]


def timed(fn: Callable[[], object], iters: int) -> float:
    """Seconds per call after one warm-up call (which also compiles)."""
    fn()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def bench_jax(task: str, batch: int, size: int, iters: int, precision: str) -> float:
    import jax
    import numpy as np
    from flax import nnx

    from flaxtumor.config import Config
    from flaxtumor.models import build_model
    from flaxtumor.train import sharding
    from flaxtumor.train.loop import compute_dtype, make_optimizer, make_train_step
    from flaxtumor.train.losses import make_loss

    cfg = Config().override(**{"train.task": task, "train.precision": precision})
    mesh = sharding.make_mesh()
    model = build_model(cfg, nnx.Rngs(0))
    model.train()
    optimizer = nnx.Optimizer(model, make_optimizer(cfg.train, cfg.train.lr, 1000, 100), wrt=nnx.Param)
    nnx.update(model, sharding.replicate(nnx.state(model), mesh))
    nnx.update(optimizer, sharding.replicate(nnx.state(optimizer), mesh))
    step = make_train_step(make_loss(cfg.train), nnx.Param, compute_dtype(precision))
    rng = np.random.default_rng(0)
    batch = sharding.shard_batch(
        {
            "image": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
            "mask": (rng.random((batch, size, size, 1)) > 0.9).astype(np.float32),
            "label": (rng.random(batch) > 0.5).astype(np.float32),
        },
        mesh,
    )
    return batch["image"].shape[0] / timed(lambda: jax.block_until_ready(step(model, optimizer, batch)), iters)


def bench_torch(task: str, batch: int, size: int, iters: int) -> float:
    import torch
    from torch import nn

    sys.path.insert(0, str(REPO))
    from tests.models.torch_reference import TorchResUNet, torch_classifier

    torch.manual_seed(0)
    if task == "cls":
        model = torch_classifier()
        target = (torch.rand(batch) > 0.5).float()
    else:
        model = TorchResUNet()
        target = (torch.rand(batch, 1, size, size) > 0.9).float()
    x = torch.randn(batch, 3, size, size)
    bce = nn.BCEWithLogitsLoss()

    def loss_fn(logits: torch.Tensor) -> torch.Tensor:
        if task == "cls":
            return bce(logits, target)
        probs = torch.sigmoid(logits)
        dice = 1 - (2 * (probs * target).sum() + 1) / (probs.sum() + target.sum() + 1)
        return bce(logits, target) + dice

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3, weight_decay=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return batch / timed(step, iters)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default="cls,seg", help="comma list of cls, seg")
    parser.add_argument("--batch", type=int, default=8, help="global batch (must divide by the device count)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--iters", type=int, default=2, help="timed steps after one warm-up step")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    args = parser.parse_args()

    import jax

    gpu = jax.default_backend() == "gpu"
    precisions = ["fp32", "bf16"] if gpu else ["fp32"]
    devices = jax.devices()
    print(f"jax {jax.__version__} on {len(devices)} x {devices[0].device_kind}; batch {args.batch}, "
          f"{args.size}x{args.size}, {args.iters} timed steps, images/s")
    if not args.no_torch:
        import torch

        # The torch wheel here is CPU-only: on a GPU its numbers are a CPU reference, and no ratio is printed.
        print(f"torch {torch.__version__} on cpu, {torch.get_num_threads()} threads")
    print(f"{'task':5s} {'precision':9s} {'jax':>8s} {'torch':>8s} {'jax/torch':>10s}")
    for task in args.tasks.split(","):
        reference = None if args.no_torch else bench_torch(task, args.batch, args.size, args.iters)
        for precision in precisions:
            ours = bench_jax(task, args.batch, args.size, args.iters, precision)
            ratio = f"{ours / reference:9.2f}x" if reference and not gpu else f"{'-':>10s}"
            torch_col = f"{reference:8.2f}" if reference else f"{'-':>8s}"
            print(f"{task:5s} {precision:9s} {ours:8.2f} {torch_col} {ratio}", flush=True)


if __name__ == "__main__":
    main()

"""Training-step throughput (images/s) of the real train step, JAX vs PyTorch 2.13 in the same run.

    python bench/train_step.py                                  # cls + seg; 256x256 batch 8 and 128x128 batch 16
    python bench/train_step.py --tasks seg --rows 128x16 --runs 1 --steps 2     # a quick look
    python bench/train_step.py --torch-variants nchw,channels_last             # skip torch.compile

On a GPU (JAX and torch both see it), both frameworks run there, in fp32 and in bf16 (JAX: bf16 compute with fp32
master weights, as `--precision bf16` trains; torch: autocast), each precision against its own kind.

JAX runs `flaxtumor.train.loop.make_train_step`: the training loss, clipping + AdamW, the batch sharded over all
devices, donated state. PyTorch runs the same architectures (tests/models/torch_reference.py, checked against the Flax
models in tests/models/test_torch_twins.py) with the same loss and optimizer, in every variant of
bench/torch_baseline.py. The classifier trains whole (random init, as without --backbone-weights).

Method: every step function is warmed up (compiled) first. Then `--runs` rounds; each round times `--steps`
consecutive steps of every framework/variant in turn, so all of them see the same machine load. Each row reports the
min and median over rounds; the headline ratio is JAX's median against the fastest torch variant's median.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch_baseline  # noqa: E402


def jax_step(task: str, batch: int, size: int, precision: str) -> Callable[[], object]:
    """One call = one real train step on a fixed random batch (warm it up before timing). It returns without waiting
    for the device, as in the training loop; `timed_calls` waits for the last result."""
    import numpy as np
    from flax import nnx

    from flaxtumor.config import Config
    from flaxtumor.models import build_model
    from flaxtumor.train import sharding
    from flaxtumor.train.loop import bind_train_step, compute_dtype, make_optimizer, make_train_step
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
    data = sharding.shard_batch(
        {
            "image": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
            "mask": (rng.random((batch, size, size, 1)) > 0.9).astype(np.float32),
            "label": (rng.random(batch) > 0.5).astype(np.float32),
        },
        mesh,
    )
    bound = bind_train_step(step, model, optimizer)  # as the training loop calls it
    return lambda: bound(data)


def torch_step(task: str, batch: int, size: int, variant: str) -> Callable[[], object]:
    import torch
    from torch import nn

    model = torch_baseline.torch_model(task)
    target = (torch.rand(batch) > 0.5).float() if task == "cls" else (torch.rand(batch, 1, size, size) > 0.9).float()
    model, x, call = torch_baseline.prepare(model, torch.randn(batch, 3, size, size), variant)
    target = target.to(x.device)
    bce = nn.BCEWithLogitsLoss()
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3, weight_decay=1e-4)

    def loss_fn(logits: torch.Tensor) -> torch.Tensor:
        if task == "cls":
            return bce(logits, target)
        probs = torch.sigmoid(logits)
        dice = 1 - (2 * (probs * target).sum() + 1) / (probs.sum() + target.sum() + 1)
        return bce(logits, target) + dice

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(call(x)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return step


def candidates(task: str, batch: int, size: int, precisions: list[str], variants: list[str]) -> dict[str, Callable]:
    """Warmed-up step functions by label; a torch variant that fails to build is reported and left out."""
    steps: dict[str, Callable] = {}
    for precision in precisions:
        steps[f"jax {precision}"] = jax_step(task, batch, size, precision)
    for variant in variants:
        try:
            steps[f"torch {variant}"] = torch_step(task, batch, size, variant)
            steps[f"torch {variant}"]()
            steps[f"torch {variant}"]()  # compile variants specialise on the second call too
        except Exception as e:  # noqa: BLE001 — any failure to build a baseline is reported, not fatal
            steps.pop(f"torch {variant}", None)
            print(f"  torch {variant}: unavailable here ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    for label, fn in steps.items():
        if label.startswith("jax"):
            fn()
            torch_baseline.block(fn())  # compiles, then one more step on donated buffers
    return steps


def bench_row(task: str, batch: int, size: int, args: argparse.Namespace, precisions: list[str]) -> None:
    steps = candidates(task, batch, size, precisions, [v for v in args.torch_variants.split(",") if v])
    rates: dict[str, list[float]] = {label: [] for label in steps}
    for _ in range(args.runs):
        for label, fn in steps.items():  # interleaved: every framework sees the same load in each round
            rates[label].append(batch / torch_baseline.timed_calls(fn, args.steps))
    torch_baseline.print_rates(f"{task:4s} {size:4d} {batch:3d}", rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default="cls,seg", help="comma list of cls, seg")
    parser.add_argument("--rows", default="256x8,128x16", help="comma list of SIZExBATCH (global batch)")
    parser.add_argument("--runs", type=int, default=3, help="interleaved rounds; min and median are reported")
    parser.add_argument("--steps", type=int, default=5, help="timed consecutive steps per framework per round")
    parser.add_argument("--torch-variants", default=None, help="default: every variant of this device")
    parser.add_argument("--no-torch", action="store_true", help="JAX only")
    args = parser.parse_args()
    if args.no_torch:
        args.torch_variants = ""
    elif args.torch_variants is None:
        args.torch_variants = torch_baseline.default_variants()
    args.torch_variants = args.torch_variants.strip(",")

    cpus = torch_baseline.pin_threads() if args.torch_variants else None
    import jax

    args.gpu = jax.default_backend() == "gpu"
    precisions = ["fp32", "bf16"] if args.gpu else ["fp32"]
    devices = jax.devices()
    print(f"jax {jax.__version__} on {len(devices)} x {devices[0].device_kind}; {args.runs} rounds x {args.steps} "
          f"timed steps per framework, images/s")
    if cpus:
        print(torch_baseline.thread_report())
    for task in args.tasks.split(","):
        for row in args.rows.split(","):
            size, batch = (int(v) for v in row.split("x"))
            bench_row(task, batch, size, args, precisions)


if __name__ == "__main__":
    main()

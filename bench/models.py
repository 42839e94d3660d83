"""Forward and train-step throughput (images/s) of the ResNet50 classifier and the ResUNet, JAX vs PyTorch, same run.

    python bench/models.py                                  # both models, both frameworks, batch 8 at 256x256
    python bench/models.py --xla-flags=--xla_cpu_use_onednn=true --frameworks jax
    python bench/models.py --models resunet --batch 4 --torch-channels-last

The PyTorch models are the test references (tests/models/torch_reference.py): same layers, NCHW by default.
Timings on a shared CPU are noisy: compare the printed JAX/torch ratios, not absolute numbers.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def jax_passes(model_name: str, batch: int, size: int) -> dict[str, Callable[[], object]]:
    """Compiled forward (eval mode) and train step (Adam, every parameter) of one model, warmed up."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from flaxtumor.config import ModelConfig
    from flaxtumor.models import build_classifier, build_segmenter

    rngs = nnx.Rngs(0)
    model = build_classifier(ModelConfig(), rngs) if model_name == "resnet50" else build_segmenter(ModelConfig(), rngs)
    x = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
    y = jnp.ones((batch,) if model_name == "resnet50" else (batch, size, size, 1)) * 0.5

    forward_model = nnx.view(model, deterministic=True, use_running_average=True, raise_if_not_found=False)
    forward = nnx.jit(lambda m, x: m(x))
    optimizer = nnx.Optimizer(model, optax.adam(1e-4), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(lambda m: optax.sigmoid_binary_cross_entropy(m(x), y).mean())(model)
        optimizer.update(model, grads)
        return loss

    model.train()
    passes = {
        "forward": lambda: forward(forward_model, x).block_until_ready(),
        "train": lambda: step(model, optimizer, x, y).block_until_ready(),
    }
    for fn in passes.values():
        fn()  # compiles
    return passes


def torch_passes(model_name: str, batch: int, size: int, channels_last: bool) -> dict[str, Callable[[], object]]:
    import torch
    from torch import nn

    sys.path.insert(0, str(REPO))
    from tests.models.torch_reference import TorchResUNet, torch_classifier

    torch.manual_seed(0)
    if model_name == "resnet50":
        model = torch_classifier()
        y = torch.full((batch,), 0.5)
    else:
        model = TorchResUNet()
        y = torch.full((batch, 1, size, size), 0.5)
    x = torch.randn(batch, 3, size, size)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)

    def forward() -> None:
        model.eval()
        with torch.no_grad():
            model(x)
        model.train()

    optimizer = torch.optim.Adam(model.parameters(), 1e-4)
    loss_fn = nn.BCEWithLogitsLoss()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()

    passes = {"forward": forward, "train": step}
    for fn in passes.values():
        fn()  # warm-up: allocator, oneDNN primitive caches
    return passes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="resnet50,resunet", help="comma list of resnet50, resunet")
    parser.add_argument("--frameworks", default="jax,torch", help="comma list of jax, torch")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--iters", type=int, default=3, help="timed rounds after one warm-up; the fastest counts")
    parser.add_argument("--xla-flags", default="", help="appended to XLA_FLAGS before jax is imported")
    parser.add_argument("--torch-channels-last", action="store_true", help="NHWC memory format for torch")
    args = parser.parse_args()

    # Must happen before jax is imported anywhere.
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {args.xla_flags}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    frameworks = args.frameworks.split(",")
    if "torch" in frameworks:
        import torch

        print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, channels_last={args.torch_channels_last}")
    if "jax" in frameworks:
        import jax

        print(f"jax {jax.__version__}, XLA_FLAGS={os.environ['XLA_FLAGS']!r}")
    print(f"batch {args.batch}, {args.size}x{args.size}, best of {args.iters} alternating rounds, images/s")
    ratio_header = "  jax/torch" if len(frameworks) == 2 else ""
    print(f"{'model':10s} {'pass':8s} " + " ".join(f"{f:>8s}" for f in frameworks) + ratio_header)
    for model_name in args.models.split(","):
        passes = {
            f: jax_passes(model_name, args.batch, args.size) if f == "jax"
            else torch_passes(model_name, args.batch, args.size, args.torch_channels_last)
            for f in frameworks
        }
        # Rounds alternate the frameworks and keep each one's fastest call: on a shared CPU the minimum is the least
        # disturbed measurement, and alternating exposes both to the same load.
        best = {(f, p): float("inf") for f in frameworks for p in ("forward", "train")}
        for _ in range(args.iters):
            for (f, p) in best:
                best[f, p] = min(best[f, p], seconds(passes[f][p]))
        for phase in ("forward", "train"):
            rate = {f: args.batch / best[f, phase] for f in frameworks}
            row = " ".join(f"{rate[f]:8.2f}" for f in frameworks)
            ratio = f"  {rate['jax'] / rate['torch']:8.2f}x" if len(frameworks) == 2 else ""
            print(f"{model_name:10s} {phase:8s} {row}{ratio}", flush=True)

if __name__ == "__main__":
    main()

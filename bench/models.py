"""Forward (inference) throughput, images/s, of the ResNet50 classifier and the ResUNet: JAX vs PyTorch, same run.

    python bench/models.py                                   # both models; 256x256 batch 8 and 128x128 batch 16
    python bench/models.py --models resunet --rows 128x16 --runs 2
    python bench/models.py --xla-flags=--xla_cpu_use_onednn=true

On a GPU (JAX and torch both see it), both frameworks run there, in fp32 and in bf16 (JAX: weights and input cast to
bf16; torch: autocast), each precision against its own kind.

Eval mode on both sides (BatchNorm running statistics, no dropout); PyTorch under `torch.inference_mode()` in every
variant of bench/torch_baseline.py (NCHW, channels-last, torch.compile). Each round times `--calls` consecutive calls
of every framework/variant in turn; rows give min and median over rounds, and the headline ratio is JAX's median
against the fastest torch variant's median. Training steps are in bench/train_step.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch_baseline  # noqa: E402


def jax_forward(model_name: str, batch: int, size: int, precision: str = "fp32") -> Callable[[], object]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from flaxtumor.config import ModelConfig
    from flaxtumor.models import build_classifier, build_segmenter

    rngs = nnx.Rngs(0)
    model = build_classifier(ModelConfig(), rngs) if model_name == "resnet50" else build_segmenter(ModelConfig(), rngs)
    model.eval()
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))  # as the inference pipeline runs it
    x = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
    if precision == "bf16":
        state, x = jax.tree.map(lambda a: a.astype(jnp.bfloat16) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                                (state, x))
    return lambda: forward(state, x)  # timed_calls waits for the last call's result


def torch_forward(model_name: str, batch: int, size: int, variant: str) -> Callable[[], object]:
    import torch

    model = torch_baseline.torch_model("cls" if model_name == "resnet50" else "seg").eval()
    model, x, call = torch_baseline.prepare(model, torch.randn(batch, 3, size, size), variant)

    def forward() -> None:
        with torch.inference_mode():
            call(x)

    return forward


def bench_row(model_name: str, batch: int, size: int, args: argparse.Namespace) -> None:
    calls: dict[str, Callable] = {f"jax {p}": jax_forward(model_name, batch, size, p) for p in args.precisions}
    for variant in filter(None, args.torch_variants.split(",")):
        try:
            calls[f"torch {variant}"] = torch_forward(model_name, batch, size, variant)
        except Exception as e:  # noqa: BLE001 — a baseline that cannot be built here is reported, not fatal
            print(f"  torch {variant}: unavailable here ({type(e).__name__})")
    for label, fn in list(calls.items()):
        try:
            torch_baseline.block((fn(), fn()))  # compile / specialise, then one steady call
        except Exception as e:  # noqa: BLE001
            calls.pop(label)
            print(f"  {label}: failed to run here ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
    rates: dict[str, list[float]] = {label: [] for label in calls}
    for _ in range(args.runs):
        for label, fn in calls.items():
            rates[label].append(batch / torch_baseline.timed_calls(fn, args.calls))
    torch_baseline.print_rates(f"{model_name:9s} {size:4d} {batch:3d}", rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="resnet50,resunet", help="comma list of resnet50, resunet")
    parser.add_argument("--rows", default="256x8,128x16", help="comma list of SIZExBATCH")
    parser.add_argument("--runs", type=int, default=3, help="interleaved rounds; min and median are reported")
    parser.add_argument("--calls", type=int, default=5, help="timed consecutive calls per framework per round")
    parser.add_argument("--torch-variants", default=None, help="default: every variant of this device")
    parser.add_argument("--xla-flags", default="", help="appended to XLA_FLAGS before jax is imported")
    args = parser.parse_args()

    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {args.xla_flags}".strip()
    torch_baseline.pin_threads()
    if args.torch_variants is None:
        args.torch_variants = torch_baseline.default_variants()
    import jax

    args.precisions = ["fp32", "bf16"] if jax.default_backend() == "gpu" else ["fp32"]
    print(f"jax {jax.__version__}, XLA_FLAGS={os.environ['XLA_FLAGS']!r}; {torch_baseline.thread_report()}")
    print(f"{args.runs} rounds x {args.calls} timed calls per framework, images/s (forward, eval mode)")
    for model_name in args.models.split(","):
        for row in args.rows.split(","):
            size, batch = (int(v) for v in row.split("x"))
            bench_row(model_name, batch, size, args)


if __name__ == "__main__":
    main()

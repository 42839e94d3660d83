"""The PyTorch baseline of the benches: the same architectures (tests/models/torch_reference.py), every variant a
PyTorch user would try, and one thread setting for both frameworks.

CPU variants: ``nchw`` (eager, the default memory format), ``channels_last`` (eager, NHWC memory: oneDNN's fast path)
and ``compile`` (``torch.compile`` of the channels-last model, when it works here).
GPU variants (when torch sees CUDA, the benches run both frameworks on the GPU): ``cuda_fp32`` and ``cuda_bf16``
(eager, channels-last, bf16 through autocast), with PyTorch's default TF32 settings.

The headline ratio of every bench is JAX against the **fastest** variant of the same precision measured in the same
run: fp32 against fp32, bf16 against bf16.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("nchw", "channels_last", "compile")
GPU_VARIANTS = ("cuda_fp32", "cuda_bf16")


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def default_variants() -> str:
    return ",".join(GPU_VARIANTS if on_gpu() else VARIANTS)


def precision_of(label: str) -> str:
    return "bf16" if "bf16" in label else "fp32"


def pin_threads() -> int:
    """Both frameworks get the CPUs this process may run on; returns their count.

    XLA:CPU sizes its intra-op pool from the same affinity mask, so both frameworks use the same cores.
    """
    cpus = len(os.sched_getaffinity(0))
    os.environ.setdefault("OMP_NUM_THREADS", str(cpus))
    import torch

    torch.set_num_threads(cpus)
    torch.set_num_interop_threads(1) if torch.get_num_interop_threads() != 1 else None
    return cpus


def thread_report() -> str:
    import torch

    if on_gpu():
        return (f"torch {torch.__version__} on {torch.cuda.get_device_name()}: cudnn.allow_tf32="
                f"{torch.backends.cudnn.allow_tf32}, matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}")
    return (f"cpus in affinity {len(os.sched_getaffinity(0))}; torch {torch.__version__}: intra-op threads "
            f"{torch.get_num_threads()}, inter-op {torch.get_num_interop_threads()}, "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; XLA:CPU: one intra-op pool over the same cpus")


def torch_model(task: str):
    """The classifier (cls) or the ResUNet (seg) twin, in train mode."""
    import torch

    sys.path.insert(0, str(REPO))
    from tests.models.torch_reference import TorchResUNet, torch_classifier

    torch.manual_seed(0)
    model = torch_classifier() if task == "cls" else TorchResUNet()
    return model.train()


def prepare(model, x, variant: str) -> tuple[object, object, Callable]:
    """(model, input, callable model) for a variant; `compile` raises if inductor cannot build here. A cuda_* variant
    moves model and input to the GPU; cuda_bf16 runs the call under bf16 autocast."""
    import torch

    if variant.startswith("cuda"):
        model, x = model.cuda(), x.cuda()
    if variant != "nchw":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    call = torch.compile(model) if variant == "compile" else model
    if variant == "cuda_bf16":
        eager = call

        def call(inputs):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return eager(inputs).float()

    return model, x, call


def timed_calls(fn: Callable[[], object], calls: int) -> float:
    """Seconds per call over `calls` consecutive calls (the caller has warmed `fn` up). Neither framework waits for
    the device between calls, as neither does in training; the clock stops once the last call's work is done."""
    start = time.perf_counter()
    for _ in range(calls):
        last = fn()
    block(last)
    return (time.perf_counter() - start) / calls


def block(result: object) -> None:
    """Waits for the device work behind `result` (JAX arrays) and for any queued torch CUDA work."""
    if "jax" in sys.modules:
        sys.modules["jax"].block_until_ready(result)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.synchronize()


def print_rates(row: str, rates: dict[str, list[float]], ratios: bool = True) -> None:
    """min and median img/s of each label (JAX and "torch <variant>" rows, in order); with `ratios`, every JAX row's
    median against the fastest torch variant of its precision (the headline) and against each other such variant."""
    medians = {label: statistics.median(r) for label, r in rates.items()}
    for label in rates:
        ratio = ""
        torch_labels = [t for t in rates if t.startswith("torch") and precision_of(t) == precision_of(label)]
        fastest = max(torch_labels, key=medians.get) if torch_labels else None
        if label.startswith("jax") and fastest and ratios:
            ratio = f"  {medians[label] / medians[fastest]:5.2f}x vs {fastest} (headline)"
            ratio += "".join(f"; {medians[label] / medians[t]:.2f}x vs {t}" for t in torch_labels if t != fastest)
        print(f"{row}  {label:20s} min {min(rates[label]):7.2f}  median {medians[label]:7.2f}{ratio}", flush=True)

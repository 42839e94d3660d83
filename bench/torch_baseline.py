"""The PyTorch baseline of the benches: the same architectures (tests/models/torch_reference.py), every variant a
PyTorch user would try on a CPU, and one thread setting for both frameworks.

Variants: ``nchw`` (eager, the default memory format), ``channels_last`` (eager, NHWC memory: oneDNN's fast path) and
``compile`` (``torch.compile`` of the channels-last model, when it works here). The headline ratio of every bench is
JAX against the **fastest** variant measured in the same run.
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
    """(model, input, callable model) for a variant; `compile` raises if inductor cannot build here."""
    import torch

    if variant != "nchw":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    call = torch.compile(model) if variant == "compile" else model
    return model, x, call


def timed_calls(fn: Callable[[], object], calls: int) -> float:
    """Seconds per call over `calls` consecutive calls (the caller has warmed `fn` up)."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def print_rates(row: str, rates: dict[str, list[float]], ratios: bool = True) -> None:
    """min and median img/s of each label (JAX and "torch <variant>" rows, in order); with `ratios`, every JAX row's
    median against the fastest torch variant (the headline) and against each other variant."""
    medians = {label: statistics.median(r) for label, r in rates.items()}
    torch_labels = [label for label in rates if label.startswith("torch")]
    fastest = max(torch_labels, key=medians.get) if torch_labels else None
    for label in rates:
        ratio = ""
        if label.startswith("jax") and fastest and ratios:
            ratio = f"  {medians[label] / medians[fastest]:5.2f}x vs {fastest} (headline)"
            ratio += "".join(f"; {medians[label] / medians[t]:.2f}x vs {t}" for t in torch_labels if t != fastest)
        print(f"{row}  {label:20s} min {min(rates[label]):7.2f}  median {medians[label]:7.2f}{ratio}", flush=True)

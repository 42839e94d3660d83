"""Where one real train step spends its time, per XLA op (the loop's step: loss, clipping, AdamW).

    python bench/profile_step.py --task cls                 # ResNet50 classifier, 128x128, batch 16
    python bench/profile_step.py --task seg --size 256 --batch 8 --top 15

Traces a few steps with `jax.profiler` (a Perfetto trace holds one event per executed XLA op on CPU), joins the op
names with the optimised HLO (dumped by XLA) and prints the top ops by time with what they compute: convolutions by
window (size, stride, lhs dilation = a transposed/strided-input gradient) and shapes, fusions by their root. The
shares are per step; they need a quiet machine no more than the ratios of the other benches do.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=("cls", "seg"), default="cls")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="traced steps after one warm-up step")
    parser.add_argument("--top", type=int, default=10)
    return parser.parse_args()


def _computations(text: str) -> dict[str, list[str]]:
    """Computation name -> the opcodes in its body (fused computations included)."""
    bodies: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        head = re.match(r"(?:ENTRY )?%?([\w.\-]+) \(.*\{$", line)
        if head:
            current = bodies.setdefault(head.group(1), [])
        elif line.startswith("}"):
            current = None
        elif current is not None:
            m = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = \S+ (\w[\w\-]*)\(", line)
            if m:
                current.append(m.group(1))
    return bodies


def _describe(op: str, shape: str, rest: str, bodies: dict[str, list[str]]) -> str:
    if op == "convolution":
        window = re.search(r"window=\{([^}]*)\}", rest)
        operands = re.findall(r"(\w+\[[\d,]*\])", rest)
        return f"conv {window.group(1) if window else ''} {' x '.join(operands[:2])} -> {shape}"
    if op != "fusion":
        return f"{op} -> {shape}"
    calls = re.search(r"calls=%?([\w.\-]+)", rest)
    body = set(bodies.get(calls.group(1), [])) if calls else set()
    # What dominates a fusion's cost: a convolution or dot inside it, else a reduction, else data movement.
    for kind in ("convolution", "dot", "reduce-window", "select-and-scatter", "reduce", "transpose", "scatter"):
        if kind in body:
            return f"fusion[{kind}] -> {shape}"
    return f"fusion[elementwise] -> {shape}"


def hlo_ops(dump: Path) -> dict[str, str]:
    """Instruction name -> a one-line description, from the optimised HLO of the largest module."""
    files = sorted(dump.glob("*after_optimizations.txt"), key=lambda p: p.stat().st_size)
    if not files:
        return {}
    text = files[-1].read_text()
    bodies = _computations(text)
    ops: dict[str, str] = {}
    for line in text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) (\w[\w\-]*)\((.*)", line)
        if m:
            name, shape, op, rest = m.groups()
            ops[name] = _describe(op, shape, rest, bodies)
    return ops


def main() -> None:
    args = parse_args()
    dump = Path(tempfile.mkdtemp(prefix="flaxtumor-hlo-"))
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump} --xla_dump_hlo_as_text".strip()
    sys.path.insert(0, str(REPO / "bench"))
    import jax
    from train_step import jax_step  # the same set-up as the throughput bench

    step = jax_step(args.task, args.batch, args.size, "fp32")
    step()
    trace = Path(tempfile.mkdtemp(prefix="flaxtumor-trace-"))
    jax.profiler.start_trace(str(trace), create_perfetto_trace=True)
    for _ in range(args.steps):
        step()
    jax.profiler.stop_trace()

    events = json.load(gzip.open(next(trace.rglob("perfetto_trace.json.gz"))))
    events = events["traceEvents"] if isinstance(events, dict) else events
    ops = hlo_ops(dump)
    per_op: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("ph") == "X" and e["name"] in ops:
            per_op[e["name"]] += e.get("dur", 0.0) / 1e3 / args.steps  # ms per step
    total = sum(per_op.values())
    kinds: dict[str, float] = defaultdict(float)
    for name, ms in per_op.items():
        desc = ops[name]
        kind = desc.split(" ")[0] + (" lhs-dilated (strided input grad)" if "lhs_dilate" in desc else "")
        kinds[kind] += ms
    print(f"{args.task} {args.size}x{args.size} batch {args.batch}: {total:.1f} ms of XLA ops per step "
          f"({args.batch / total * 1e3:.2f} img/s if nothing else ran)")
    print("by kind:", ", ".join(f"{k} {v:.0f} ms ({v / total:.0%})" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])))
    print(f"top {args.top} ops:")
    for name, ms in sorted(per_op.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"  {ms:7.2f} ms {ms / total:5.1%}  {ops[name][:150]}")


if __name__ == "__main__":
    main()

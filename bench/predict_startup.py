"""A 40-slice patient through `python -m flaxtumor.predict`, timed from process start to exit, against a plain PyTorch
script that does the same work (both models, masks written) in the same run.

    python bench/predict_startup.py                 # a real 40-slice patient when ../shared/lgg is here, else synthetic
    python bench/predict_startup.py --runs 5

flaxtumor runs on the bundled checkpoints: once with empty caches (cold: what the very first run on a machine costs)
and `--runs` times with the caches filled (warm: every later run); see runtime.py for the compilation and serving
caches. The PyTorch reference
(bench/torch_predict.py) builds the same two architectures (as many ResUNets as the checkpoints' segmenter has
members, their probabilities averaged), loads their weights from .pt files, reads the slices, resizes them to the
checkpoints' size, classifies and segments every slice and writes the masks. Runs alternate between
the two programs; each row gives min and median wall seconds. flaxtumor's own `--verbose` breakdown of its last warm
run is printed too.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_PATIENT = REPO.parent / "shared" / "lgg" / "kaggle_3m" / "TCGA_DU_5851_19950428"  # 40 slices


def patient_folder(work: Path) -> tuple[Path, str]:
    """A 40-slice patient folder: the real one when present, else a synthetic patient in kaggle_3m layout."""
    if SHARED_PATIENT.is_dir():
        return SHARED_PATIENT, "real (TCGA_DU_5851_19950428)"
    sys.path.insert(0, str(REPO))
    from flaxtumor.data.synthetic import write_synthetic_dataset

    root = write_synthetic_dataset(work / "synthetic", n_patients=1, n_slices=40)
    return next(p for p in Path(root).rglob("TCGA_*") if p.is_dir()), "synthetic"


def segmenter_members(checkpoints: Path) -> int:
    """How many models the bundled segmenter averages (1 unless it is an ensemble folder)."""
    sys.path.insert(0, str(REPO))
    from flaxtumor.checkpoint_metadata import read_metadata
    from flaxtumor.ensemble import member_paths

    folder = checkpoints / "segmenter"
    return len(member_paths(folder, read_metadata(folder))) or 1


def wall(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return seconds, done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="warm runs of each program")
    parser.add_argument("--checkpoints", type=Path, default=REPO / "checkpoints")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="flaxtumor-bench-"))
    try:
        patient, kind = patient_folder(work)
        env = {**os.environ, "FLAXTUMOR_CACHE_DIR": str(work / "cache"), "PYTHONWARNINGS": "ignore"}
        ours = [sys.executable, "-m", "flaxtumor.predict", str(patient), "--out", str(work / "ours"),
                "--checkpoints", str(args.checkpoints), "--verbose"]
        torch_cmd = [sys.executable, str(REPO / "bench" / "torch_predict.py"), str(patient), "--out",
                     str(work / "torch"), "--weights", str(work / "torch-weights"),
                     "--segmenters", str(segmenter_members(args.checkpoints))]
        subprocess.run([*torch_cmd, "--save-weights-only"], check=True, cwd=REPO, env=env)
        print(f"patient: {kind}, {sum(1 for p in patient.iterdir() if not p.stem.endswith('_mask'))} slices; "
              f"segmenter members: {torch_cmd[-1]}; {os.cpu_count()} cpus; wall seconds from process start to exit")
        cold, _ = wall(ours, env)
        times: dict[str, list[float]] = {"flaxtumor (warm cache)": [], "pytorch script": []}
        breakdown = ""
        for _ in range(args.runs):
            seconds, err = wall(ours, env)
            times["flaxtumor (warm cache)"].append(seconds)
            breakdown = next((line for line in err.splitlines() if line.startswith("time:")), breakdown)
            times["pytorch script"].append(wall(torch_cmd, env)[0])
        print(f"{'flaxtumor (cold cache)':24s} {cold:6.2f}")
        for label, values in times.items():
            print(f"{label:24s} min {min(values):6.2f}  median {statistics.median(values):6.2f}")
        print(f"flaxtumor --verbose (last warm run): {breakdown}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

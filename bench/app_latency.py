"""End-to-end latency of the Gradio app through its API, on this machine's CPU.

Reports: app start-up time (process start to serving, and the app's own line), one slice's p50/p95 through
/predict_slice (upload, decode, classify, segment, Grad-CAM, PNG outputs, download), a 40-slice patient through
/predict_patient at the app's own operating point (the controls' start values), and the pipeline alone at batch 1 (in
this process) for the ≤150 ms/slice target.

    python bench/app_latency.py [--checkpoints checkpoints] [--slices 30] [--image-size 128] [--patient DIR]

The patient is synthetic unless --patient names a kaggle_3m patient folder (its slices, without the masks): the app
segments only the slices its classifier gate lets through, so a real patient and the shipped models give the
realistic number (e.g. `--patient ../shared/lgg/kaggle_3m/TCGA_DU_5851_19950428`, 40 slices).

Without shipped checkpoints (no DIR/classifier), it exports randomly initialised checkpoints of the full-size
architectures (ResNet50 classifier, ResUNet 16..256) at --image-size, and says so: the timings do not depend on the
weights. Targets: ≤150 ms per slice at batch 1 in the pipeline, ≤3 s per 40-slice patient.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def random_checkpoints(out: Path, image_size: int) -> Path:
    """Full-size architectures with random weights, exported like training does (default Config otherwise)."""
    from flax import nnx

    from flaxtumor.config import Config
    from flaxtumor.data.preprocess import Preprocessing
    from flaxtumor.models import build_model
    from flaxtumor.checkpoints import export_inference

    for name, task, normalisation in (("classifier", "cls", "imagenet"), ("segmenter", "seg", "volume_zscore")):
        cfg = Config().override(**{"train.task": task, "data.image_size": image_size, "data.normalisation": normalisation})
        metadata = {
            "config": cfg.to_dict(), "task": task, "preprocessing": Preprocessing(image_size, normalisation).to_dict(),
            "threshold": 0.5, "backbone_init": "none (random weights: benchmark only)", "split": {}, "metrics": {},
            "history": [], "versions": {},
        }
        export_inference(out / name, build_model(cfg, nnx.Rngs(0)), metadata)
    return out


def _sizes(checkpoints: Path) -> str:
    mb = {d.name: sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) / 2**20 for d in sorted(checkpoints.iterdir())}
    return ", ".join(f"{name} {size:.1f} MiB" for name, size in mb.items())


def resolve_checkpoints(path: str, image_size: int, scratch: Path) -> tuple[Path, str]:
    if (Path(path) / "classifier").is_dir():
        return Path(path), f"checkpoints from {path} ({_sizes(Path(path))})"
    out = random_checkpoints(scratch / "random-checkpoints", image_size)
    return out, f"RANDOM full-size checkpoints at {image_size} px, no {path}/classifier ({_sizes(out)})"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(checkpoints: Path, log: Path, timeout: float = 600.0) -> tuple[subprocess.Popen, str, float, str]:
    """Runs `python app.py` (output to `log`) and waits until it serves: (process, url, wall seconds, its ready line)."""
    port = free_port()
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "app.py"), "--checkpoints", str(checkpoints), "--host", "127.0.0.1",
             "--port", str(port)],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True,
        )
    while not (ready := [ln for ln in log.read_text().splitlines() if "ready at" in ln]):
        if proc.poll() is not None or time.perf_counter() - start > timeout:
            proc.kill()
            raise SystemExit(f"app did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    url = re.search(r"(http://\S+?):? start-up", ready[0]).group(1)
    urllib.request.urlopen(url, timeout=30).read()
    return proc, url, time.perf_counter() - start, ready[0].strip()


def stop_app(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def synthetic_patient(out: Path, n_slices: int) -> tuple[Path, Path]:
    """(zip of one synthetic patient, one of its tumour slices), made by the project's generator."""
    from flaxtumor.data.synthetic import write_synthetic_dataset

    root = write_synthetic_dataset(out / f"synthetic-{n_slices}", n_patients=1, n_slices=n_slices, size=256, seed=3)
    patient = next(p for p in root.iterdir() if p.is_dir())
    archive = out / f"patient_{n_slices}.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(patient.iterdir()):
            zf.write(p, f"{patient.name}/{p.name}")
    return archive, patient / f"{patient.name}_{n_slices // 2}.tif"


def percentiles(seconds: list[float]) -> str:
    ms = np.array(seconds) * 1000
    return f"p50 {np.percentile(ms, 50):.0f} ms, p95 {np.percentile(ms, 95):.0f} ms (n={len(ms)})"


def pipeline_alone(checkpoints: Path, patient: Path, image: Path, repeats: int = 20) -> list[str]:
    """The pipeline without HTTP, Grad-CAM or PNG encoding, at batch sizes 1 and 8 (calls are padded to the batch)."""
    from flaxtumor.data.io import read_image
    from flaxtumor.inference import Pipeline

    x = read_image(image)
    volume = [read_image(p) for p in sorted(patient.glob("*.tif")) if not p.stem.endswith("_mask")]
    lines = []
    for batch_size in (1, 8):
        pipeline = Pipeline.from_checkpoints(checkpoints, batch_size=batch_size, gate=False)  # both models every time
        pipeline.predict_slices([x])  # compile
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            pipeline.predict_slices([x])
            times.append(time.perf_counter() - t)
        t = time.perf_counter()
        pipeline.predict_volume(volume, pipeline.point.override(lcc=True))
        lines.append(f"batch_size={batch_size}: one slice {percentiles(times)}; "
                     f"{len(volume)}-slice volume {time.perf_counter() - t:.2f} s")
    return lines


@contextlib.contextmanager
def bench_setup(checkpoints: str, image_size: int, patient_slices: int, patient: str | None = None
                ) -> Iterator[dict]:
    """A scratch folder with the checkpoints (shipped, or random at `image_size`) and a patient zip: synthetic, or
    the slices of the kaggle_3m folder `patient`."""
    with tempfile.TemporaryDirectory(prefix="flaxtumor-bench-") as tmp:
        scratch = Path(tmp)
        resolved, which = resolve_checkpoints(checkpoints, image_size, scratch)
        archive, one_slice = synthetic_patient(scratch, patient_slices)
        if patient is not None:
            archive = real_patient(Path(patient), scratch)
        print(f"checkpoints: {which}; patient: {patient or 'synthetic'}")
        yield dict(scratch=scratch, checkpoints=resolved, archive=archive, one_slice=one_slice)


def real_patient(folder: Path, out: Path) -> Path:
    """A zip of a kaggle_3m patient folder's slices, without their masks."""
    slices = sorted(p for p in folder.glob("*.tif") if not p.stem.endswith("_mask"))
    if not slices:
        raise SystemExit(f"error: --patient {folder}: no slices (*.tif) there")
    archive = out / f"{folder.name}.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in slices:
            zf.write(p, f"{folder.name}/{p.name}")
    return archive


@contextlib.contextmanager
def running_app(setup: dict) -> Iterator[tuple[str, float, str]]:
    """A freshly started `python app.py` on the setup's checkpoints: (url, start-up seconds, its ready line)."""
    proc, url, wall, line = start_app(setup["checkpoints"], setup["scratch"] / "app.log")
    try:
        yield url, wall, line
    finally:
        stop_app(proc)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", default=str(REPO / "checkpoints"))
    parser.add_argument("--image-size", type=int, default=128, help="for random checkpoints only")
    parser.add_argument("--slices", type=int, default=30, help="single-slice requests to time")
    parser.add_argument("--patients", type=int, default=3, help="40-slice patient requests to time")
    parser.add_argument("--patient", help="a kaggle_3m patient folder to time instead of the synthetic one")
    args = parser.parse_args(argv)

    from gradio_client import Client, handle_file

    with bench_setup(args.checkpoints, args.image_size, 40, args.patient) as setup:
        one_slice = setup["one_slice"]
        with running_app(setup) as (url, wall, line):
            print(f"start-up: {wall:.1f} s from process start to serving; app says: {line}")
            client = Client(url, verbose=False)
            client.predict(handle_file(str(one_slice)), 0.5, False, api_name="/predict_slice")  # connection warm-up
            times = []
            for _ in range(args.slices):
                t = time.perf_counter()
                client.predict(handle_file(str(one_slice)), 0.5, False, api_name="/predict_slice")
                times.append(time.perf_counter() - t)
            print(f"one slice end-to-end via /predict_slice (incl. Grad-CAM): {percentiles(times)}")
            times = []
            for _ in range(args.patients):
                t = time.perf_counter()
                # only the files: every control at its start value, the app's operating point
                table = client.predict([handle_file(str(setup["archive"]))], api_name="/predict_patient")[1]
                times.append(time.perf_counter() - t)
            print(f"{len(table['data'])}-slice patient end-to-end via /predict_patient: "
                  f"{', '.join(f'{s:.2f} s' for s in times)} (median {np.median(times):.2f} s; target ≤3 s for 40)")
        # after the server stopped, so it does not compete for the cores
        print("pipeline alone, classifier + segmenter on every slice (target ≤150 ms per slice at batch 1):")
        for line in pipeline_alone(setup["checkpoints"], one_slice.parent, one_slice):
            print("  " + line)


if __name__ == "__main__":
    main()

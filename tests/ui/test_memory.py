"""The bounded-memory test of issue 14: 30 patient requests through the API, each in a new session, against a freshly
started `python app.py`; the server's resident memory (psutil) must plateau.

Each request is a 60-slice 256x256 patient: before the fix, the slice browser kept every decoded image and mask in
per-session state forever (~15 MB a request here, ~450 MB after 30). The bound, measured after 5 warm-up requests:
growth of at most 100 MB over the next 30. Measured: +7 and +16 MB (two runs); the code before the fix grew +454 MB
(599 -> 1053 MB).
"""

from __future__ import annotations

import sys
from pathlib import Path

import psutil
import pytest
from gradio_client import Client, handle_file

from tests.ui import files as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from app_latency import start_app, stop_app  # noqa: E402

WARM_UP, REQUESTS, BOUND_MB = 5, 30, 100
SLICES, SIDE = 60, 256


def _rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


@pytest.mark.slow
def test_memory_plateaus_over_30_api_sessions(tiny, tmp_path: Path) -> None:
    members = {f"TCGA_M/TCGA_M_{i}.png": F.png_bytes(F.slice_array(SIDE, seed=i)) for i in range(1, SLICES + 1)}
    archive = F.zip_of(tmp_path / "patient.zip", members)
    proc, url, _, _ = start_app(tiny.checkpoints, tmp_path / "app.log")
    try:
        def request() -> None:
            client = Client(url, verbose=False)  # a new session every time, never closed: like raw /call/ use
            table = client.predict([handle_file(str(archive))], 0.5, False, None, None, api_name="/predict_patient")[1]
            assert len(table["data"]) == SLICES

        for _ in range(WARM_UP):
            request()
        start = _rss_mb(proc.pid)
        peak = start
        for _ in range(REQUESTS):
            request()
            peak = max(peak, _rss_mb(proc.pid))
        end = _rss_mb(proc.pid)
        print(f"server RSS after {WARM_UP} warm-up requests {start:.0f} MB; after {REQUESTS} more {end:.0f} MB "
              f"(growth {end - start:+.0f} MB, peak {peak:.0f} MB; bound +{BOUND_MB} MB)")
        assert end - start <= BOUND_MB, (start, end)
    finally:
        stop_app(proc)

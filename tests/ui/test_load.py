"""A lighter version of bench/app_load.py: 8 concurrent clients x 3 requests, zero failures."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gradio_client import Client, handle_file

from tests.ui import files as F


def test_eight_concurrent_clients(served, files: Path) -> None:
    path = str(F.good_png(files))

    def one_client(k: int) -> list[str]:
        client = Client(served[0], verbose=False)
        # Alternate thresholds: concurrent requests must not see each other's setting.
        threshold = 0.0 if k % 2 == 0 else 1.0
        return [client.predict(handle_file(path), threshold, False, api_name="/predict_slice")[0]["label"] for _ in range(3)]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one_client, range(8)))
    assert results == [["tumour"] * 3 if k % 2 == 0 else ["no tumour"] * 3 for k in range(8)]

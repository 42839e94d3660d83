"""Load: 8 concurrent gradio_client clients x 10 requests each against a freshly started `python app.py`.

Each client alternates /predict_slice uploads and /example runs, with alternating thresholds (0 and 1). Every
response must equal the one the same request got alone before the load (verdict, probability, tumour area), so a
request that failed or saw another request's threshold counts as a failure. Exits 1 on any.

    python bench/app_load.py [--checkpoints checkpoints] [--clients 8] [--requests 10]
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from app_latency import bench_setup, percentiles, running_app  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", default=str(Path(__file__).resolve().parents[1] / "checkpoints"))
    parser.add_argument("--image-size", type=int, default=128, help="for random checkpoints only")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=10)
    args = parser.parse_args(argv)

    from gradio_client import Client, handle_file

    from flaxtumor.data.io import read_mask

    with bench_setup(args.checkpoints, args.image_size, 20) as setup, running_app(setup) as (url, wall, _):
        # A tumour-free slice: there the classifier threshold decides the verdict, so cross-talk would show.
        one_slice = next(p.with_name(p.name.replace("_mask", "")) for p in sorted(setup["one_slice"].parent.glob(
            "*_mask.tif")) if not read_mask(p).any())
        print(f"app serving after {wall:.1f} s; {args.clients} clients x {args.requests} requests")

        def request(client, i: int, threshold: float) -> tuple:
            if i % 2 == 0:
                out = client.predict(handle_file(str(one_slice)), threshold, False, api_name="/predict_slice")
            else:
                out = client.predict("synthetic_tumour_slice.tif", threshold, False, api_name="/example")
            return out[0]["label"], out[1], out[2]  # verdict, probability, tumour area

        # The answers each request gets alone: with a fused gate, threshold 1 need not mean "no tumour".
        reference = {(i % 2, th): request(Client(url, verbose=False), i, th) for i in (0, 1) for th in (0.0, 1.0)}
        assert reference[(0, 0.0)] != reference[(0, 1.0)] or reference[(1, 0.0)] != reference[(1, 1.0)], \
            "thresholds 0 and 1 give the same answers: the check could not see cross-talk"

        def client_run(k: int) -> tuple[list[float], list[str]]:
            client = Client(url, verbose=False)
            times, failures = [], []
            for i in range(args.requests):
                threshold = 0.0 if (k + i) % 2 == 0 else 1.0
                t = time.perf_counter()
                try:
                    got, expected = request(client, i, threshold), reference[(i % 2, threshold)]
                    if got != expected:
                        failures.append(f"client {k} request {i}: got {got!r}, alone it got {expected!r}")
                except Exception:  # noqa: BLE001 — every failure is counted and shown
                    failures.append(f"client {k} request {i}: {traceback.format_exc(limit=1).strip()}")
                times.append(time.perf_counter() - t)
            return times, failures

        start = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            results = list(pool.map(client_run, range(args.clients)))
        total = time.perf_counter() - start
    times = [t for ts, _ in results for t in ts]
    failures = [f for _, fs in results for f in fs]
    print(f"{len(times)} requests in {total:.1f} s ({len(times) / total:.2f} req/s); latency under load: {percentiles(times)}; "
          f"max {np.max(times):.1f} s; failures: {len(failures)}")
    for f in failures[:10]:
        print("  " + f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

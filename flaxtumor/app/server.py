"""Starting the app: `python app.py [--checkpoints DIR] [--classifier DIR] [--segmenter DIR] [--host H] [--port P]
[--share] [--examples DIR]`: load the checkpoints once, warm up, launch.

`--classifier DIR` / `--segmenter DIR` pair a newly trained model with a shipped one: each defaults to the one in
`--checkpoints`, and the operating point is always `--checkpoints DIR/pipeline.json` (tuned for that folder's pair; the
start-up log says so when a model comes from elsewhere).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import gradio as gr
import numpy as np

from flaxtumor.app.state import Housekeeping
from flaxtumor.app.ui import CSS, MAX_FILE_SIZE, Demo, build_demo
from flaxtumor.app.service import Predictor

SESSION_CAPACITY = 1000  # sessions whose state Gradio keeps (its default, 10,000, each with a copy of the config)
# The pipeline pads every call to its batch size. Measured on 2 CPU cores with full-size models (bench/app_latency.py):
# one slice padded to 8 costs ~6x batch 1; a 40-slice patient takes 2.5 s at batch 1 vs 2.1 s at 8 (128 px inputs),
# 6.1 s vs 7.4 s (256 px). Batch 1 keeps single slices fast and needs one compiled shape.
BATCH_SIZE = 1


def warm_up(pipeline: Predictor) -> float:
    """Compiles every model function the app calls once, so the first user does not wait; returns seconds. The
    pipeline resizes every slice to the checkpoint's size and pads batches to its fixed batch size, so one call covers
    all later shapes."""
    start = time.perf_counter()
    image = np.zeros((256, 256, 3), np.uint8)
    image[64:192, 64:192] = 100
    pipeline.tumour_probabilities([image], volume=True)
    pipeline.segment([image], volume=True)
    pipeline.gradcam(image)
    return time.perf_counter() - start


def launch(demo: Demo, host: str | None = None, port: int | None = None, share: bool = False,
           prevent_thread_lock: bool = False) -> str:
    """Starts the server with the app's limits; returns its local URL."""
    app = demo.app
    # The exact example files only, never their folder: whatever else lands there is not served.
    allowed = sorted(str(p.resolve()) for p in [*app.examples.slices.values(), *app.examples.patients])
    _, url, _ = demo.blocks.launch(server_name=host, server_port=port, share=share, max_file_size=MAX_FILE_SIZE,
                                   allowed_paths=allowed, prevent_thread_lock=prevent_thread_lock,
                                   theme=gr.themes.Soft(), css=CSS, footer_links=["api", "gradio"],
                                   state_session_capacity=SESSION_CAPACITY)
    Housekeeping(app.janitor.sweep, app.store.sweep, app.dirs.sweep).start()
    return url


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="app.py", description="flaxtumor Gradio app (research use only)")
    parser.add_argument("--checkpoints", default="checkpoints", metavar="DIR",
                        help="folder with classifier/, segmenter/ and the operating point pipeline.json "
                             "(default: checkpoints, i.e. run from the repository root)")
    parser.add_argument("--classifier", default=None, metavar="DIR",
                        help="classifier checkpoint folder (default: DIR/classifier of --checkpoints)")
    parser.add_argument("--segmenter", default=None, metavar="DIR",
                        help="segmenter checkpoint folder (default: DIR/segmenter of --checkpoints)")
    parser.add_argument("--host", default=None, metavar="H", help="bind address (default 127.0.0.1; 0.0.0.0 on Spaces via GRADIO_SERVER_NAME)")
    parser.add_argument("--port", type=int, default=None, metavar="P", help="port (default 7860 or GRADIO_SERVER_PORT)")
    parser.add_argument("--share", action="store_true", help="create a public gradio.live link (off by default)")
    parser.add_argument("--examples", default=None, metavar="DIR", help="folder of example slices (images) and patients (.zip)")
    return parser.parse_args(argv)


def _load(args: argparse.Namespace) -> tuple[Predictor | None, float]:
    from flaxtumor.inference import Pipeline

    what = " and ".join(f"--{k} {v}" for k, v in (("classifier", args.classifier), ("segmenter", args.segmenter)) if v)
    try:
        t0 = time.perf_counter()
        # Threshold, post-processing, TTA and gating start at DIR/pipeline.json when it exists (the tuned point).
        pipeline = Pipeline.from_checkpoints(args.checkpoints, batch_size=BATCH_SIZE, classifier=args.classifier,
                                             segmenter=args.segmenter)
        loaded = time.perf_counter() - t0
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError with a one-line message
        source = f"{what} (--checkpoints {args.checkpoints})" if what else args.checkpoints
        print(f"error: cannot load checkpoints from {source}: {str(e).splitlines()[0]}", file=sys.stderr)
        return None, 0.0
    if what:
        tuned = Path(args.checkpoints) / "pipeline.json"
        note = (f"the operating point is {tuned}, tuned for the models in {args.checkpoints}" if tuned.is_file()
                else f"no {tuned}: the operating point is the checkpoints' own thresholds")
        print(f"note: {what} paired with {args.checkpoints}; {note}", file=sys.stderr, flush=True)
    return pipeline, loaded


def main(argv: Sequence[str] | None = None, started: float | None = None) -> int:
    """Load once, warm up, serve. `started` is a perf_counter() taken before the heavy imports (by app.py)."""
    started = time.perf_counter() if started is None else started
    args = parse_args(argv)
    if args.examples is not None and not Path(args.examples).is_dir():
        print(f"error: --examples {args.examples}: no such folder", file=sys.stderr)
        return 2
    from flaxtumor.runtime import enable_compilation_cache

    enable_compilation_cache()  # a restart (or a Space waking up on the same disk) skips compiling the models
    pipeline, loaded = _load(args)
    if pipeline is None:
        return 2
    from flaxtumor.inference import ContextWarning

    warnings.filterwarnings("ignore", category=ContextWarning)  # the app warns per slice, where the user reads it
    warm = warm_up(pipeline)
    demo = build_demo(pipeline, args.examples)
    url = launch(demo, args.host, args.port, args.share, prevent_thread_lock=True)
    # A stop by SIGTERM (Spaces, docker, the benches) exits normally, so atexit removes the temp dirs too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"flaxtumor app ready at {url}: start-up {time.perf_counter() - started:.1f} s "
          f"(checkpoints {loaded:.1f} s, warm-up {warm:.1f} s)", flush=True)
    try:
        demo.blocks.block_thread()
    finally:
        demo.blocks.close()
    return 0

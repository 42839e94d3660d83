"""The Gradio app: one slice or a whole patient in, verdict, mask overlay, tumour burden and Grad-CAM out.

`build_demo(pipeline)` wires the UI around an already loaded `flaxtumor.inference.Pipeline`; `main()` is what `app.py`
runs: load the checkpoints once, warm up, launch.

Files come in through `gr.File` (browsers cannot display TIFF) and are checked and decoded on the server by
`flaxtumor.app.uploads`; every bad upload becomes a `gr.Error` naming the file, and the server stays up.

Files and state (`flaxtumor.app.state`): everything lives in one private temp root (mode 0700, umask 077) that also
holds Gradio's temp dir: uploads (deleted after 10 minutes when no request used them, and at once when a request
refused them), per-request input and output folders (deleted with their request, outputs after a grace period),
the slice browser's thumbnails (TTL, capacity and byte cap; sessions only hold a token) and the synthetic examples.
What the app says to clients (escaping, number fields, errors without server details) is in `flaxtumor.app.errors`.

The request logic is `flaxtumor.app.service`, the model card `flaxtumor.app.model_card`, the examples
`flaxtumor.app.examples`, the Gradio patches `flaxtumor.app.gradio_patches`.
"""

from __future__ import annotations

import argparse
import functools
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from flaxtumor.app.gradio_patches import atomic_image_cache, no_stray_temp_files
from flaxtumor.app.errors import user_errors
from flaxtumor.app.state import BrowserStore, Housekeeping, private_root
from flaxtumor.app.uploads import UploadLimits
from flaxtumor.app.examples import default_examples_dir, find_examples
from flaxtumor.app.model_card import model_card_markdown, threshold_info
from flaxtumor.app.service import App, Predictor, SliceResult
# Names that `flaxtumor.ui` has always offered (tests and scripts import them from there).
from flaxtumor.app.service import PATIENT_COLUMNS, brain_mask, tumour_area, _one_size  # noqa: F401
from flaxtumor.app.state import RequestDirs  # noqa: F401

NOTICE = (
    "**Research use only. Not a medical device.** This demo has not been clinically validated and must not be used "
    "for diagnosis or treatment decisions. Uploads and results are kept in private temporary folders on the server for "
    "at most an hour, then deleted."
)
MAX_FILE_SIZE = "100mb"  # per uploaded file, enforced by Gradio before our checks run
QUEUE_MAX_SIZE = 64  # waiting requests; more are refused with "queue full" rather than piling up memory
DELETE_CACHE = (600, 3600)  # Gradio cache: every 10 min delete files older than 1 h
SESSION_CAPACITY = 1000  # sessions whose state Gradio keeps (its default, 10,000, each with a copy of the config)
TUMOUR_COLOUR = "#ff3b30"
IMAGE_TYPES = ".tif, .tiff, .png, .jpg, .jpeg"
IMAGE_HEIGHT = 384  # px on screen: kaggle_3m slices are 256 px; small uploads are scaled up to stay readable
# The pipeline pads every call to its batch size. Measured on 2 CPU cores with full-size models (bench/app_latency.py):
# one slice padded to 8 costs ~6x batch 1; a 40-slice patient takes 2.5 s at batch 1 vs 2.1 s at 8 (128 px inputs),
# 6.1 s vs 7.4 s (256 px). Batch 1 keeps single slices fast and needs one compiled shape.
BATCH_SIZE = 1



def _slice_outputs(r: SliceResult) -> tuple:
    return r.verdict, r.probability, r.overlay, r.area_px, r.area_pct, r.gradcam, str(r.mask_file), r.details


def _browse(store: BrowserStore, token: Any, index: Any) -> Any:
    """The viewer at slice `index` (1-based) of the patient behind `token`, read back from its thumbnails."""
    try:
        i = int(index or 1) - 1
    except (TypeError, ValueError, OverflowError):
        i = 0
    shown = store.get(token, i) if token else None
    if shown is None:
        label = "Slice viewer (this result has expired: analyse the patient again)" if token else "Slice viewer"
        return gr.AnnotatedImage(value=None, label=label)
    label = f"Slice {shown.index + 1}/{shown.count}: {shown.name} (tumour probability {shown.probability:.2f})"
    return gr.AnnotatedImage(value=(shown.image, [(shown.mask, "tumour")]), label=label)


@dataclass(frozen=True)
class Demo:
    """What `build_demo` gives its caller: the Gradio Blocks to launch, and the app behind them (its examples, which
    `launch` serves, and its temp folders)."""

    blocks: gr.Blocks
    app: App


def build_demo(
    pipeline: Predictor,
    examples_dir: str | Path | None = None,
    limits: UploadLimits = UploadLimits(),
    concurrency_limit: int = 2,
) -> Demo:
    """The app around a loaded pipeline; the threshold and LCC controls start at its operating point. Examples come
    from `examples_dir`, else from the synthetic generator."""
    private_root()  # before any Blocks: Gradio's temp dir is read when they are made
    atomic_image_cache()
    examples = find_examples(Path(examples_dir) if examples_dir is not None else default_examples_dir())
    app = App(pipeline, examples, limits)
    with gr.Blocks(title="flaxtumor: LGG MRI tumour detection (research use only)", delete_cache=DELETE_CACHE) as demo:
        gr.Markdown("# flaxtumor: brain-tumour detection and segmentation on LGG MRI slices")
        gr.Markdown(NOTICE, elem_id="notice")
        with gr.Accordion("Model card", open=False):
            gr.Markdown(model_card_markdown(pipeline.summary()), elem_id="model-card")
        with gr.Row():
            threshold = gr.Slider(0.0, 1.0, value=pipeline.point.threshold, step=0.01, label="Classification threshold",
                                  info=threshold_info(pipeline.point.min_tumour_area))
            # Range-checked by App._point, with a message naming the field (Gradio's own does not).
            threshold.preprocess = lambda payload: payload  # type: ignore[method-assign]
            lcc = gr.Checkbox(value=pipeline.point.lcc, label="Keep only the largest connected tumour component",
                              info="3D over a patient's slices, 2D on a single slice.")

        _slice_tab(app, (threshold, lcc), concurrency_limit)
        _patient_tab(app, (threshold, lcc))

        gr.Markdown(f"Upload limits: {limits.describe()}; at most {MAX_FILE_SIZE} per file.")
    demo.queue(default_concurrency_limit=concurrency_limit, max_size=QUEUE_MAX_SIZE)
    app.janitor.blocks = demo
    return Demo(demo, app)


def _slice_tab(app: App, controls: tuple[gr.Slider, gr.Checkbox], concurrency_limit: int) -> None:
    """The "Single slice" tab: upload or example in, verdict with its meaning, overlay, area and Grad-CAM out."""
    threshold, lcc = controls
    point, examples = app.pipeline.point, app.examples
    with gr.Tab("Single slice"):
        with gr.Row():
            with gr.Column(scale=1):
                slice_file = no_stray_temp_files(gr.File(label=f"MRI slice ({IMAGE_TYPES})", elem_id="slice-file"))
                slice_button = gr.Button("Analyse slice", variant="primary", elem_id="slice-button")
                example = gr.Dropdown(list(examples.slices), value=next(iter(examples.slices), None),
                                      label="Or try a synthetic example (made by flaxtumor.data.synthetic)",
                                      elem_id="example-choice")
                example_button = gr.Button("Run example", elem_id="example-button")
                verdict = gr.Label(label="Verdict", elem_id="verdict")
                probability = gr.Number(label="Tumour probability", precision=3)
                with gr.Row():
                    area_px = gr.Number(label="Tumour area (px)", precision=0)
                    area_pct = gr.Number(label="Tumour area (% of brain)", precision=2)
                details = gr.Markdown(label="Details")
                mask_file = gr.File(label="Mask (PNG, 0/255, input size)")
            with gr.Column(scale=2):
                with gr.Row():
                    overlay = gr.AnnotatedImage(label="Predicted tumour mask", color_map={"tumour": TUMOUR_COLOUR}, format="png",
                                                height=IMAGE_HEIGHT)
                    heatmap = gr.Image(label="Grad-CAM of the classifier", type="numpy", format="png",
                                       interactive=False, height=IMAGE_HEIGHT)
        slice_outputs = [verdict, probability, overlay, area_px, area_pct, heatmap, mask_file, details]
        def predict_slice(image: Any, threshold: float | None = point.threshold,
                          largest_component: bool = point.lcc) -> tuple:
            return _slice_outputs(app.predict_slice(image, threshold, largest_component))

        def run_example(example: str | None, threshold: float | None = point.threshold,
                        largest_component: bool = point.lcc) -> tuple:
            return _slice_outputs(app.run_example(example, threshold, largest_component))

        slice_button.click(
            user_errors(predict_slice),
            [slice_file, threshold, lcc], slice_outputs, api_name="predict_slice", concurrency_id="slice",
            concurrency_limit=concurrency_limit,
        )
        example_button.click(
            user_errors(run_example),
            [example, threshold, lcc], slice_outputs, api_name="example", concurrency_id="slice",
            concurrency_limit=concurrency_limit,
        )


def _patient_tab(app: App, controls: tuple[gr.Slider, gr.Checkbox]) -> None:
    """The "Whole patient" tab: slices and/or zips in (one or several patients), per-patient summaries, a slice
    browser, per-slice charts and table, and a zip of the masks."""
    threshold, lcc = controls
    point, examples = app.pipeline.point, app.examples
    with gr.Tab("Whole patient"):
        with gr.Row():
            with gr.Column(scale=1):
                patient_files = no_stray_temp_files(gr.File(
                    file_count="multiple", label=f"Slices ({IMAGE_TYPES}) or one .zip of a patient folder",
                    elem_id="patient-files"))
                with gr.Row():
                    spacing = gr.Number(value=None, label="Pixel spacing (mm)")
                    thickness = gr.Number(value=None, label="Slice thickness (mm)")
                patient_button = gr.Button("Analyse patient", variant="primary", elem_id="patient-button")
                if examples.patients:
                    gr.Examples([[[str(p)]] for p in examples.patients], inputs=[patient_files],
                                label="Synthetic example patient")
                summary = gr.Markdown(label="Summary", elem_id="patient-summary")
                masks_zip = gr.File(label="All masks (zip of PNGs + predictions.csv)")
            with gr.Column(scale=2):
                browser_slider = gr.Slider(1, 2, value=1, step=1, label="Slice", interactive=False)
                browser_image = gr.AnnotatedImage(label="Slice viewer", color_map={"tumour": TUMOUR_COLOUR}, format="png",
                                                  height=IMAGE_HEIGHT)
                with gr.Row():
                    prob_plot = gr.LinePlot(x="slice", y="tumour_probability", y_lim=[0, 1], label="Tumour probability per slice")
                    area_plot = gr.LinePlot(x="slice", y="tumour_pixels", label="Tumour area per slice (px)")
        table = gr.Dataframe(label="Per-slice results", interactive=False)
        # Only a token per session (Gradio keeps API sessions until its capacity); it expires with the thumbnails.
        browser_state = gr.State(time_to_live=app.browser.ttl_s, delete_callback=app.browser.release)

        def predict_patient(files: Any, threshold: float | None = point.threshold,
                            largest_component: bool = point.lcc, pixel_spacing_mm: float | None = None,
                            slice_thickness_mm: float | None = None) -> tuple:
            r = app.predict_patient(files, threshold, largest_component, pixel_spacing_mm, slice_thickness_mm)
            # Gradio sliders need minimum < maximum: a one-slice patient gets a disabled 1..2 slider.
            n = r.count
            slider = gr.Slider(1, max(n, 2), value=r.first + 1, step=1, label="Slice", interactive=n > 1)
            viewer = _browse(app.browser, r.browser, r.first + 1)
            return r.summary, r.table, r.table, r.table, slider, viewer, str(r.masks_zip), r.browser

        patient_button.click(
            user_errors(predict_patient), [patient_files, threshold, lcc, spacing, thickness],
            [summary, table, prob_plot, area_plot, browser_slider, browser_image, masks_zip, browser_state],
            api_name="predict_patient", concurrency_id="patient", concurrency_limit=1,
        )
        browser_slider.input(functools.partial(_browse, app.browser), [browser_state, browser_slider], browser_image,
                             api_visibility="private",
                             concurrency_limit=None, trigger_mode="always_last", show_progress="hidden")


def warm_up(pipeline: Predictor) -> float:
    """Compiles every model function once so the first user does not wait; returns seconds. The pipeline resizes
    every slice to the checkpoint's size and pads batches to its fixed batch size, so one call covers all later shapes."""
    start = time.perf_counter()
    image = np.zeros((256, 256, 3), np.uint8)
    image[64:192, 64:192] = 100
    # gate off: the segmenter compiles too
    pipeline.predict_volume([image], pipeline.point.override(lcc=True, gate=False))
    pipeline.gradcam(image)
    return time.perf_counter() - start


def launch(demo: Demo, host: str | None = None, port: int | None = None, share: bool = False,
           prevent_thread_lock: bool = False) -> str:
    """Starts the server with the app's limits; returns its local URL."""
    app = demo.app
    # The exact example files only, never their folder: whatever else lands there is not served.
    allowed = sorted(str(p.resolve()) for p in [*app.examples.slices.values(), *app.examples.patients])
    _, url, _ = demo.blocks.launch(server_name=host, server_port=port, share=share, max_file_size=MAX_FILE_SIZE,
                            allowed_paths=allowed, prevent_thread_lock=prevent_thread_lock, theme=gr.themes.Soft(),
                            footer_links=["api", "gradio"], state_session_capacity=SESSION_CAPACITY)
    Housekeeping(app.janitor.sweep, app.browser.sweep, app.dirs.sweep).start()
    return url


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="app.py", description="flaxtumor Gradio app (research use only)")
    parser.add_argument("--checkpoints", default="checkpoints", metavar="DIR", help="folder with classifier/ and segmenter/")
    parser.add_argument("--host", default=None, metavar="H", help="bind address (default 127.0.0.1; 0.0.0.0 on Spaces via GRADIO_SERVER_NAME)")
    parser.add_argument("--port", type=int, default=None, metavar="P", help="port (default 7860 or GRADIO_SERVER_PORT)")
    parser.add_argument("--share", action="store_true", help="create a public gradio.live link (off by default)")
    parser.add_argument("--examples", default=None, metavar="DIR", help="folder of example slices (images) and patients (.zip)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, started: float | None = None) -> int:
    """Load once, warm up, serve. `started` is a perf_counter() taken before the heavy imports (by app.py)."""
    started = time.perf_counter() if started is None else started
    args = parse_args(argv)
    if args.examples is not None and not Path(args.examples).is_dir():
        print(f"error: --examples {args.examples}: no such folder", file=sys.stderr)
        return 2
    from flaxtumor.inference import Pipeline
    from flaxtumor.runtime import enable_compilation_cache

    enable_compilation_cache()  # a restart (or a Space waking up on the same disk) skips compiling the models
    try:
        t0 = time.perf_counter()
        # Threshold, LCC, TTA and gating start at DIR/pipeline.json when it exists (the tuned operating point).
        pipeline = Pipeline.from_checkpoints(args.checkpoints, batch_size=BATCH_SIZE)
        loaded = time.perf_counter() - t0
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError with a one-line message
        print(f"error: cannot load checkpoints from {args.checkpoints}: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
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

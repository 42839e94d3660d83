"""The Gradio app: one slice or whole patients in (slices, zips of patient folders, NIfTI volumes, with the ground
truth when the user has it); verdicts, overlays, tumour burden, Dice against the truth and Grad-CAM out.

`build_demo(pipeline)` wires the UI around an already loaded `flaxtumor.inference.Pipeline`; `main()` (in
`flaxtumor.app.server`, also importable from here) is what `app.py` runs: load the checkpoints once, warm up, launch.

Live controls: only **Analyse** (or an example) runs the classifier (`App.analyse_*`). The threshold, classifier gate
and post-processing controls re-render every output from the analysis cached for the session (`App.render_*`); a point
that lets through slices the analysis left unsegmented (a lower threshold, the classifier off) segments those first,
once. Opacity and the show/hide toggles re-draw the viewers (`App.view`) without a model call. These events are private
(not API). An operating point with the classifier off (threshold inf) starts with the gate unticked.

Files come in through `gr.File` (browsers cannot display TIFF) and are checked and decoded on the server by
`flaxtumor.app.uploads`; every bad upload becomes a `gr.Error` naming the file, and the server stays up. Files and
state are private and bounded (`flaxtumor.app.state`, `flaxtumor.app.cache`); what the app says to clients is in
`flaxtumor.app.errors`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from flaxtumor.app.errors import user_errors
from flaxtumor.app.examples import default_examples_dir, find_examples
from flaxtumor.app.gradio_patches import atomic_image_cache, function_defaults, no_stray_temp_files
from flaxtumor.app.model_card import classifier_info, model_card_markdown, threshold_info
from flaxtumor.app.render import DEFAULT_OPACITY
from flaxtumor.app.service import CLASSIFIER_FIELD, CLASSIFIER_ON_THRESHOLD, App, PatientResult, Predictor, SliceResult
from flaxtumor.app.state import private_root
from flaxtumor.app.uploads import UploadLimits
from flaxtumor.operating_point import POSTPROCESS_RULES
# Names that `flaxtumor.ui` has always offered (tests and scripts import them from there).
from flaxtumor.app.report import PATIENT_COLUMNS, brain_mask, tumour_area  # noqa: F401
from flaxtumor.app.service import _one_size  # noqa: F401
from flaxtumor.app.state import RequestDirs  # noqa: F401

NOTICE = (
    "**Research use only. Not a medical device.** This demo has not been clinically validated and must not be used "
    "for diagnosis or treatment decisions. Uploads and results are kept in private temporary folders on the server for "
    "at most an hour, then deleted."
)
HOW_TO = (
    "**How to use.** 1. Pick a tab: **Single slice** for one image, **Whole patient** for a patient's slices (image "
    "files, or a .zip of the patient's folder; add the `*_mask.*` files to compare with the ground truth) or NIfTI "
    "volumes. 2. Upload, then press **Analyse**: this runs the models. 3. Move the threshold, classifier gate, "
    "post-processing, opacity and show/hide controls: the results update without running the classifier again (a lower "
    "threshold first segments the slices it newly lets through)."
)
MAX_FILE_SIZE = "100mb"  # per uploaded file, enforced by Gradio before our checks run
QUEUE_MAX_SIZE = 64  # waiting requests; more are refused with "queue full" rather than piling up memory
DELETE_CACHE = (600, 3600)  # Gradio cache: every 10 min delete files older than 1 h
IMAGE_TYPES = ".tif, .tiff, .png, .jpg, .jpeg"
VOLUME_TYPES = ".nii, .nii.gz"
IMAGE_HEIGHT = 384  # px on screen: kaggle_3m slices are 256 px; small uploads are scaled up to stay readable
# Captions sit above the images (an image's own label would cover its top), legends list only what is drawn.
CSS = """
.viewer-caption {font-weight: 600; margin: 2px 0;}
.viewer-legend {display: flex; flex-wrap: wrap; gap: 4px 14px; min-height: 1.5em; font-size: 0.92em;}
.legend-item {display: inline-flex; align-items: center; gap: 6px;}
.legend-chip {display: inline-block; width: 14px; height: 14px; border-radius: 3px; box-sizing: border-box;}
.legend-note {opacity: 0.75;}
.field-label p {margin: 0 !important; font-weight: 600;}
"""


@dataclass(frozen=True)
class Controls:
    """The shared controls: the operating point (threshold, post-processing, classifier gate) and the overlay
    display."""

    threshold: gr.Slider
    rule: gr.Dropdown
    opacity: gr.Slider
    show_prediction: gr.Checkbox
    show_truth: gr.Checkbox
    classifier: gr.Checkbox

    @property
    def point(self) -> list[gr.components.Component]:
        """The render functions' operating-point inputs, in their order."""
        return [self.threshold, self.rule, self.classifier]

    @property
    def display(self) -> list[gr.components.Component]:
        return [self.opacity, self.show_prediction, self.show_truth]


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
    """The app around a loaded pipeline; the threshold and post-processing controls start at its operating point.
    Examples come from `examples_dir`, else from the synthetic generator."""
    private_root()  # before any Blocks: Gradio's temp dir is read when they are made
    atomic_image_cache()
    examples = find_examples(Path(examples_dir) if examples_dir is not None else default_examples_dir())
    app = App(pipeline, examples, limits)
    with gr.Blocks(title="flaxtumor: LGG MRI tumour detection (research use only)", delete_cache=DELETE_CACHE) as demo:
        gr.Markdown("# flaxtumor: brain-tumour detection and segmentation on LGG MRI slices")
        gr.Markdown(NOTICE, elem_id="notice")
        gr.Markdown(HOW_TO, elem_id="how-to")
        with gr.Accordion("Model card", open=False):
            gr.Markdown(model_card_markdown(pipeline.summary()), elem_id="model-card")
        controls = _controls(app)
        _slice_tab(app, controls, concurrency_limit)
        _patient_tab(app, controls)
        gr.Markdown(f"Upload limits: {limits.describe()}; at most {MAX_FILE_SIZE} per file.")
    demo.queue(default_concurrency_limit=concurrency_limit, max_size=QUEUE_MAX_SIZE)
    function_defaults(demo)  # an omitted API parameter gets the endpoint's default, not the control's start value
    app.janitor.blocks = demo
    return Demo(demo, app)


def _controls(app: App) -> Controls:
    point = app.pipeline.point
    # Classifier off (threshold inf): the slider cannot show inf (Gradio's config would carry null), so it holds the
    # threshold the classifier gets when the user turns it back on, and waits, not interactive.
    on = math.isfinite(point.threshold)
    # Each control in its own column: a row of bare form controls is one block that squeezes instead of wrapping
    # on a phone.
    with gr.Row():
        with gr.Column(min_width=300):
            classifier = gr.Checkbox(value=on, label=CLASSIFIER_FIELD, elem_id="classifier-gate",
                                     info=classifier_info(point.min_tumour_area, point.gate))
            threshold = gr.Slider(0.0, 1.0, value=point.threshold if on else CLASSIFIER_ON_THRESHOLD, step=0.01,
                                  label="Classification threshold", interactive=on, elem_id="threshold",
                                  info=threshold_info(point.min_tumour_area, on, point.gate,
                                                      point.flag_threshold))
        with gr.Column(min_width=300):
            rule = gr.Dropdown(list(POSTPROCESS_RULES), value=point.postprocess, label="Post-processing",
                               info="The rule run over each patient's masks (a single slice is a patient of one "
                                    "slice).", elem_id="postprocess")
    with gr.Row():
        with gr.Column(min_width=300):
            opacity = gr.Slider(0.0, 1.0, value=DEFAULT_OPACITY, step=0.05, label="Overlay opacity",
                                info="Of the predicted tumour drawn over the slice.", elem_id="opacity")
        with gr.Column(min_width=300):
            show_prediction = gr.Checkbox(value=True, label="Show the prediction", elem_id="show-prediction")
            show_truth = gr.Checkbox(value=True, label="Show the true outline (when uploaded)", elem_id="show-truth")
    # Checked by App (messages that name the field; the old true/false post-processing switch still works).
    for component in (threshold, rule, opacity):
        component.preprocess = lambda payload: payload  # type: ignore[method-assign]
    # The slider follows the gate (the re-render itself is one of the live events).
    classifier.change(lambda enabled: gr.Slider(interactive=enabled is True), classifier, threshold,
                      api_visibility="private", show_progress="hidden", concurrency_limit=None)
    return Controls(threshold, rule, opacity, show_prediction, show_truth, classifier)


def _threshold_default(app: App) -> float | None:
    """The API's default threshold (`function_defaults`): the pipeline's, or None (its point) when its classifier is
    off, since inf is no JSON number and the slider's waiting value would turn the classifier on."""
    threshold = app.pipeline.point.threshold
    return threshold if math.isfinite(threshold) else None


def _token_state(app: App) -> gr.State:
    """A session holds only its analysis' token (Gradio keeps API sessions until its capacity); the analysis goes
    when the session does, or expires on its own."""

    def release(token: Any) -> None:
        # A plain function, not the bound `app.release`: Gradio deep-copies its config (this callback included) on
        # every page load, and a bound method would copy the App with the models' weights each time.
        app.release(token)

    return gr.State(time_to_live=app.store.ttl_s, delete_callback=release)


def _skip(n: int) -> tuple:
    return tuple(gr.skip() for _ in range(n))


def _label(text: str) -> None:
    """A field's label above it: Gradio's own label floats over the component's top-left, under its icons."""
    gr.Markdown(text, elem_classes="field-label")


def figures_markdown(probability: float | None, area_px: int | None, area_pct: float | None) -> str:
    """The single slice's numbers as shown: a dash, not 0, before anything is analysed."""
    prob = "–" if probability is None else f"{probability:.3f}"
    area = "–" if area_px is None else f"{area_px} px"
    pct = "–" if area_pct is None else f"{area_pct:.2f}%"
    return f"| Tumour probability | Tumour area | % of brain |\n|---|---|---|\n| {prob} | {area} | {pct} |"


def _slice_outputs(r: SliceResult) -> tuple:
    return r.verdict, r.probability, r.overlay, r.area_px, r.area_pct, r.gradcam, str(r.mask_file), r.details


def _slice_tab(app: App, controls: Controls, concurrency_limit: int) -> None:
    """The "Single slice" tab: upload or example in, verdict with its meaning, overlay, area and Grad-CAM out."""
    point, examples, default_threshold = app.pipeline.point, app.examples, _threshold_default(app)
    with gr.Tab("Single slice"):
        with gr.Row():
            with gr.Column(scale=1):
                _label(f"**MRI slice** ({IMAGE_TYPES})")
                slice_file = no_stray_temp_files(gr.File(show_label=False, elem_id="slice-file"))
                slice_button = gr.Button("Analyse slice", variant="primary", elem_id="slice-button")
                example = gr.Dropdown(list(examples.slices), value=next(iter(examples.slices), None),
                                      label="Or try a synthetic example (made by flaxtumor.data.synthetic)",
                                      elem_id="example-choice")
                example_button = gr.Button("Run example", elem_id="example-button")
                verdict = gr.Label(label="Verdict", elem_id="verdict")
                figures = gr.Markdown(figures_markdown(None, None, None), elem_id="slice-figures")
                # The API's numbers. Hidden: Gradio's Number shows 0 for "no value yet" (its frontend sets null to 0).
                probability = gr.Number(label="Tumour probability", precision=3, visible=False)
                area_px = gr.Number(label="Tumour area (px)", precision=0, visible=False)
                area_pct = gr.Number(label="Tumour area (% of brain)", precision=2, visible=False)
                details = gr.Markdown(elem_id="slice-details")
                mask_file = gr.File(label="Mask (PNG, 0/255, input size)")
            with gr.Column(scale=2):
                with gr.Row(equal_height=True):
                    with gr.Column(min_width=240):
                        caption = gr.HTML('<div class="viewer-caption">Predicted tumour</div>', elem_id="overlay-caption")
                        overlay = gr.Image(type="numpy", format="png", interactive=False, show_label=False,
                                           height=IMAGE_HEIGHT, elem_id="overlay")
                    with gr.Column(min_width=240):
                        gr.HTML('<div class="viewer-caption">Grad-CAM of the classifier</div>'
                                '<div class="viewer-legend">where the classifier looked (red: most)</div>')
                        heatmap = gr.Image(type="numpy", format="png", interactive=False, show_label=False,
                                           height=IMAGE_HEIGHT, elem_id="gradcam")
        token = _token_state(app)
    outputs = [verdict, probability, overlay, area_px, area_pct, heatmap, mask_file, details]

    # The API's parameters, in order: new ones go at the end, so positional clients keep working.
    def predict_slice(image: Any, threshold: float | None = default_threshold,
                      postprocess: str | None = point.postprocess, use_classifier: bool | None = None) -> tuple:
        r = app.analyse_slice(image, threshold, postprocess, classifier=use_classifier)
        return (*_slice_outputs(r), r.token)

    def example_fn(example: str | None, threshold: float | None = default_threshold,
                   postprocess: str | None = point.postprocess, use_classifier: bool | None = None) -> tuple:
        r = app.run_example(example, threshold, postprocess, classifier=use_classifier)
        return (*_slice_outputs(r), r.token)

    def render(token: Any, threshold: Any, rule: Any, classifier: Any, *display: Any) -> tuple:
        if not token:
            return _skip(len(outputs) + 2)
        r = app.render_slice(token, threshold, rule, app.display(*display), classifier)
        return (*_slice_outputs(r), r.caption, figures_markdown(r.probability, r.area_px, r.area_pct))

    def redraw(token: Any, threshold: Any, rule: Any, classifier: Any, *display: Any) -> tuple:
        if not token:
            return _skip(3)
        r = app.render_slice(token, threshold, rule, app.display(*display), classifier)
        return r.overlay, r.caption, figures_markdown(r.probability, r.area_px, r.area_pct)

    state_in = [token, *controls.point, *controls.display]
    for button, fn, first, api_name in ((slice_button, predict_slice, slice_file, "predict_slice"),
                                        (example_button, example_fn, example, "example")):
        button.click(user_errors(fn), [first, controls.threshold, controls.rule, controls.classifier],
                     [*outputs, token], api_name=api_name,
                     concurrency_id="slice", concurrency_limit=concurrency_limit,
                     ).success(user_errors(redraw), state_in, [overlay, caption, figures], api_visibility="private",
                               show_progress="hidden")
    _live(controls, user_errors(render), state_in, [*outputs, caption, figures], user_errors(redraw),
          [overlay, caption, figures])


def _live(controls: Controls, render: Any, inputs: list, outputs: list, redraw: Any, redraw_outputs: list) -> None:
    """Re-render on the operating-point controls (a model call only to segment slices no earlier point let through,
    one at a time: `App._finals`), re-draw on the display controls (never a model call): private events; the last
    move wins while one is running."""
    for control in controls.point:
        control.change(render, inputs, outputs, api_visibility="private", trigger_mode="always_last",
                       show_progress="hidden", concurrency_limit=None)
    for control in controls.display:
        control.change(redraw, inputs, redraw_outputs, api_visibility="private", trigger_mode="always_last",
                       show_progress="hidden", concurrency_limit=None)


def _patient_outputs(r: PatientResult) -> tuple:
    # Gradio sliders need minimum < maximum: a one-slice patient gets a disabled 1..2 slider.
    slider = gr.Slider(1, max(r.count, 2), value=r.index + 1, step=1, label="Slice", interactive=r.count > 1)
    return r.summary, r.table, r.table, r.table, slider, r.view.image, str(r.masks_zip)


def _patient_tab(app: App, controls: Controls) -> None:
    """The "Whole patient" tab: slices, zips or NIfTI volumes in (one or several patients, with their ground truth when
    uploaded), per-patient summaries, a slice viewer, per-slice charts and table, and a zip of the masks."""
    point, examples, default_threshold = app.pipeline.point, app.examples, _threshold_default(app)
    with gr.Tab("Whole patient"):
        with gr.Row():
            with gr.Column(scale=1):
                _label(f"**Slices** ({IMAGE_TYPES}), **.zip of a patient folder**, or **NIfTI volumes** "
                       f"({VOLUME_TYPES})")
                gr.Markdown("Ground truth: `<slice>_mask.<ext>` beside each slice, or a NIfTI named `*_seg*`. NIfTI: "
                            "three volumes named for their role (`t1`, `flair`, `t1ce`) or one 4-D volume. The models "
                            "were trained on kaggle_3m composites: other scanners are out of domain.",
                            elem_id="patient-help")
                patient_files = no_stray_temp_files(gr.File(file_count="multiple", show_label=False,
                                                            elem_id="patient-files"))
                with gr.Row():
                    spacing = gr.Number(value=None, label="Pixel spacing (mm)")
                    thickness = gr.Number(value=None, label="Slice thickness (mm)")
                patient_button = gr.Button("Analyse patient", variant="primary", elem_id="patient-button")
                if examples.patients:
                    gr.Examples([[[str(p)]] for p in examples.patients], inputs=[patient_files],
                                label="Synthetic example patient (with its ground truth)")
                summary = gr.Markdown(elem_id="patient-summary")
                masks_zip = gr.File(label="Download: masks (PNG, NIfTI) + predictions.csv", elem_id="masks-zip")
            with gr.Column(scale=2):
                browser_slider = gr.Slider(1, 2, value=1, step=1, label="Slice", interactive=False,
                                           elem_id="slice-slider")
                caption = gr.HTML('<div class="viewer-caption">Slice viewer</div>', elem_id="viewer-caption")
                viewer = gr.Image(type="numpy", format="png", interactive=False, show_label=False, height=IMAGE_HEIGHT,
                                  elem_id="viewer")
                with gr.Row():
                    prob_plot = gr.LinePlot(x="slice", y="tumour_probability", y_lim=[0, 1],
                                            label="Tumour probability per slice")
                    area_plot = gr.LinePlot(x="slice", y="tumour_pixels", label="Tumour area per slice (px)")
        table = gr.Dataframe(label="Per-slice results", interactive=False, elem_id="patient-table")
        token = _token_state(app)
    outputs = [summary, table, prob_plot, area_plot, browser_slider, viewer, masks_zip]

    def predict_patient(files: Any, threshold: float | None = default_threshold,
                        postprocess: str | None = point.postprocess, pixel_spacing_mm: float | None = None,
                        slice_thickness_mm: float | None = None, use_classifier: bool | None = None) -> tuple:
        r = app.analyse_patient(files, threshold, postprocess, pixel_spacing_mm, slice_thickness_mm,
                                classifier=use_classifier)
        return (*_patient_outputs(r), r.token)

    def render(token: Any, threshold: Any, rule: Any, classifier: Any, *rest: Any) -> tuple:
        if not token:
            return _skip(len(outputs) + 1)
        spacing_mm, thickness_mm, index, *display = rest
        r = app.render_patient(token, threshold, rule, spacing_mm, thickness_mm, app.display(*display), index,
                               classifier)
        return (*_patient_outputs(r), r.view.caption)

    def redraw(token: Any, threshold: Any, rule: Any, classifier: Any, *rest: Any) -> tuple:
        if not token:
            return _skip(2)
        _, _, index, *display = rest
        view = app.view(token, threshold, rule, app.display(*display), index, classifier)
        return view.image, view.caption

    state_in = [token, *controls.point, spacing, thickness, browser_slider, *controls.display]
    patient_inputs = [patient_files, controls.threshold, controls.rule, spacing, thickness, controls.classifier]
    patient_button.click(
        user_errors(predict_patient), patient_inputs, [*outputs, token],
        api_name="predict_patient", concurrency_id="patient", concurrency_limit=1,
    ).success(user_errors(redraw), state_in, [viewer, caption], api_visibility="private", show_progress="hidden")
    _live(controls, user_errors(render), state_in, [*outputs, caption], user_errors(redraw), [viewer, caption])
    for number in (spacing, thickness):
        number.change(user_errors(render), state_in, [*outputs, caption], api_visibility="private",
                      trigger_mode="always_last", show_progress="hidden", concurrency_limit=None)
    browser_slider.input(user_errors(redraw), state_in, [viewer, caption], api_visibility="private",
                         concurrency_limit=None, trigger_mode="always_last", show_progress="hidden")


# The entry points live in `flaxtumor.app.server`; these names have always been importable from here.
def warm_up(pipeline: Predictor) -> float:
    from flaxtumor.app.server import warm_up as _warm_up

    return _warm_up(pipeline)


def launch(demo: Demo, host: str | None = None, port: int | None = None, share: bool = False,
           prevent_thread_lock: bool = False) -> str:
    from flaxtumor.app.server import launch as _launch

    return _launch(demo, host, port, share, prevent_thread_lock)


def main(argv: Sequence[str] | None = None, started: float | None = None) -> int:
    from flaxtumor.app.server import main as _main

    return _main(argv, started)

"""An operating point with the classifier off (`"threshold": null` in pipeline.json, as cross-validation writes it):
the app builds with a finite slider and the classifier gate unticked, renders what `gate_and_postprocess` gives at that
point, and the gate (the checkbox, the API's `use_classifier`) turns the classifier back on without a model call.

The tiny test segmenter outlines whole slices (mask threshold 0), so the fused gate calls every slice tumour whatever
the classifier says; the classifier's own calls are the table's `classifier_call` column.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError

from flaxtumor.app.examples import Examples
from flaxtumor.app.model_card import model_card_markdown, threshold_info
from flaxtumor.app.render import Display
from flaxtumor.app.service import CLASSIFIER_ON_THRESHOLD, App
from flaxtumor.operating_point import OperatingPoint, gate_and_postprocess
from flaxtumor.uploads import UploadError
from tests.ui import files as F
from tests.ui.conftest import TEST_LIMITS, api_client, serve
from tests.ui.test_live import Counting

# What crossval writes when the area gate wins (its `tuned_on` record trimmed).
OFF_RECORD = {"threshold": None, "min_tumour_area": 0.001, "gate": True, "lcc": False,
              "tuned_on": {"classifier": "not searched: the classifier is off"}}
ENDPOINTS = ("/predict_slice", "/example", "/predict_patient")


@pytest.fixture(scope="module")
def off_pipeline(tiny, tmp_path_factory):
    from flaxtumor.inference import Pipeline

    checkpoints = tmp_path_factory.mktemp("classifier_off") / "checkpoints"
    shutil.copytree(tiny.checkpoints, checkpoints)
    (checkpoints / "pipeline.json").write_text(json.dumps(OFF_RECORD))
    pipeline = Pipeline.from_checkpoints(checkpoints)
    assert pipeline.point.threshold == math.inf and pipeline.point.min_tumour_area == 0.001
    return pipeline


@pytest.fixture(scope="module")
def off_served(off_pipeline):
    yield from serve(off_pipeline, warm=False)


@pytest.fixture(scope="module")
def off_client(off_served):
    return api_client(off_served[0])


def _no_infinity(constant: str) -> None:
    raise AssertionError(f"the config carries {constant}")


def _component(config: dict, elem_id: str) -> dict:
    (props,) = [c["props"] for c in config["components"] if c.get("props", {}).get("elem_id") == elem_id]
    return props


def test_the_app_builds_with_a_finite_slider_and_the_gate_unticked(off_served) -> None:
    import httpx

    text = httpx.get(off_served[0] + "config", timeout=30).text
    config = json.loads(text, parse_constant=_no_infinity)  # strict JSON: no Infinity or NaN anywhere
    slider, gate = _component(config, "threshold"), _component(config, "classifier-gate")
    assert slider["value"] == CLASSIFIER_ON_THRESHOLD and slider["interactive"] is False
    assert gate["value"] is False
    assert "classifier off" in slider["info"] and "at least 0.10% of it" in slider["info"]
    card = _component(config, "model-card")["value"]
    assert "| `threshold` | ∞ (classifier off) |" in card and "**The classifier is off**" in card


def _patient(tiny) -> list[Path]:
    folder = sorted(p for p in tiny.data.iterdir() if p.is_dir())[0]
    slices = [p for p in folder.glob("*.tif") if not p.stem.endswith("_mask")]
    return sorted(slices, key=lambda p: int(p.stem.rsplit("_", 1)[1]))


def _expected(pipeline, paths: list[Path], point: OperatingPoint) -> tuple[np.ndarray, np.ndarray]:
    """(classifier calls, final masks) straight from the pipeline's raw outputs through `gate_and_postprocess`."""
    from flaxtumor.data.io import read_image

    images = [read_image(p) for p in paths]
    probabilities = np.asarray(pipeline.tumour_probabilities(images, volume=True, point=point), np.float32)
    masks = np.stack(pipeline.segment(images, volume=True, point=point)).astype(bool)
    _, final = gate_and_postprocess(probabilities, masks, point)
    return probabilities >= point.threshold, final


def test_patient_analysis_at_the_off_point_and_the_gate_turned_on(off_pipeline, tiny) -> None:
    app = App(Counting(off_pipeline), Examples({}, []), TEST_LIMITS)
    paths = _patient(tiny)
    calls, final = _expected(off_pipeline, paths, off_pipeline.point)
    assert not calls.any() and final.any(axis=(1, 2)).all()  # the fused gate, not the classifier, calls them
    # The UI sends the slider's waiting value with the gate unticked: still the classifier-off point.
    for threshold, gate in ((None, None), (0.0, False), (CLASSIFIER_ON_THRESHOLD, False)):
        r = app.analyse_patient([str(p) for p in paths], threshold, None, classifier=gate)
        assert r.table["image"].tolist() == [p.name for p in paths]
        assert r.table["classifier_call"].tolist() == [0] * len(paths)
        assert r.table["tumour_pixels"].tolist() == final.sum(axis=(1, 2)).tolist()
        assert "classifier off" in r.summary
    model_calls = list(app.pipeline.calls)
    on = app.render_patient(r.token, 0.0, None, None, None, Display(), 1, classifier=True)
    assert on.table["classifier_call"].tolist() == [1] * len(paths) and "threshold 0.00" in on.summary
    off = app.render_patient(r.token, 0.0, None, None, None, Display(), 1, classifier=False)
    assert off.table.equals(r.table) and off.summary == r.summary
    assert app.pipeline.calls == model_calls  # the gate re-renders from the cache


def test_the_gate_turned_on_without_a_threshold_gets_the_sliders_start(off_pipeline) -> None:
    app = App(off_pipeline, Examples({}, []), TEST_LIMITS)
    assert app.point(None, None, True).threshold == CLASSIFIER_ON_THRESHOLD
    assert app.point(0.3, None).threshold == 0.3  # a client older than the gate: its threshold applies
    assert app.point(0.3, None, False).threshold == math.inf
    with pytest.raises(UploadError, match=re.escape("Classification threshold: must lie in [0, 1] (got 2)")):
        app.point(2, None, False)  # checked even while set aside
    finite = App(Counting(off_pipeline), Examples({}, []), TEST_LIMITS)
    finite.pipeline.point = off_pipeline.point.override(threshold=0.2)  # a pipeline whose classifier is on
    assert finite.point(None, None, True).threshold == 0.2 and finite.point(None, None).threshold == 0.2


def test_the_api_takes_use_classifier_last_and_refuses_a_bad_value(off_client, files: Path) -> None:
    info = off_client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    for endpoint in ENDPOINTS:
        params = {p["parameter_name"]: p for p in info[endpoint]["parameters"]}
        assert list(params)[-1] == "use_classifier" and params["use_classifier"]["parameter_default"] is None
        assert params["threshold"]["parameter_default"] is None  # not inf: the API's info is JSON
    image = handle_file(str(F.good_png(files)))
    details = off_client.predict(image=image, api_name="/predict_slice")[-1]
    assert "classifier off" in details  # the pipeline's default
    verdict, *_, details = off_client.predict(image, 0.0, "none", api_name="/predict_slice")  # an older client
    assert verdict["label"] == "tumour" and "threshold 0.00" in details
    details = off_client.predict(image=image, threshold=0.0, use_classifier=False, api_name="/predict_slice")[-1]
    assert "classifier off" in details
    details = off_client.predict(image=image, use_classifier=True, api_name="/predict_slice")[-1]
    assert f"threshold {CLASSIFIER_ON_THRESHOLD:.2f}" in details
    details = off_client.predict("synthetic_tumour_slice.tif", use_classifier=True, threshold=1.0,
                                 api_name="/example")[-1]
    assert "threshold 1.00" in details
    table = off_client.predict(files=[image], threshold=0.0, use_classifier=True, api_name="/predict_patient")[1]
    assert table["data"][0][table["headers"].index("classifier_call")] == 1
    for endpoint, first in (("/predict_slice", {"image": image}), ("/predict_patient", {"files": [image]})):
        with pytest.raises(AppError, match=re.escape("Classifier gate: expected true or false (got yes).")):
            off_client.predict(**first, use_classifier="yes", api_name=endpoint)


def test_help_and_model_card_say_what_calls_a_slice_tumour_with_the_classifier_off() -> None:
    assert threshold_info(0.0005) == threshold_info(0.0005, True, True)  # the finite point's help is unchanged
    area = threshold_info(0.001, classifier_on=False)
    assert area.startswith("The checkpoints' operating point has the classifier off") and "0.10%" in area
    assert "wherever the segmenter outlines a region" in threshold_info(0.0, classifier_on=False, gate=False)
    assert "no slice is called tumour" in threshold_info(0.0, classifier_on=False, gate=True)
    point = {"threshold": math.inf, "min_tumour_area": 0.0, "gate": False}
    card = model_card_markdown({"pipeline": point, "operating_point": {"threshold": None, "gate": False}})
    assert "**The classifier is off** at this operating point" in card and "no gate empties a mask" in card
    for finite in ({"threshold": 0.15, "gate": True}, {}):
        assert "classifier is off" not in model_card_markdown({"pipeline": finite})

"""A real browser: Debian's headless chromium, driven by chromedriver over plain W3C WebDriver HTTP (no selenium or
playwright dependency), loads the app, uploads slices, patient zips with their ground truth, moves the live controls
and checks what is drawn, at 1400 px and 390 px wide.

Needs `apt-get install -y chromium chromium-driver` (.ci/run installs both); skips with that reason otherwise.
Screenshots are attached to the test output: saved under the test's tmp dir (`<tmp>/screenshots/*.png`, printed and
recorded as the test's `screenshot` properties), and copied to FLAXTUMOR_SCREENSHOT_DIR when it is set.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.ui import files as F

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian chromium and chromedriver: apt-get install -y chromium chromium-driver",
)
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C WebDriver key of an element reference


class WebDriver:
    """The handful of W3C WebDriver commands this test needs."""

    def __init__(self, port: int):
        self.base = f"http://127.0.0.1:{port}"
        options = {
            "binary": CHROMIUM,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-background-networking", "--window-size=1400,1900"],
        }
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}}
        self.session = f"{self.base}/session/{self._call('POST', '/session', caps)['sessionId']}"
        self.viewport = (1400, 1900)

    def _call(self, method: str, path: str, body: dict | None = None, base: str | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request((base or self.base) + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())["value"]

    def command(self, method: str, path: str, body: dict | None = None) -> Any:
        return self._call(method, path, body, base=self.session)

    def find(self, css: str) -> str:
        return self.command("POST", "/element", {"using": "css selector", "value": css})[ELEMENT]

    def script(self, js: str, *args: Any) -> Any:
        return self.command("POST", "/execute/sync", {"script": js, "args": list(args)})

    def text(self, css: str) -> str:
        return self.script("const e = document.querySelector(arguments[0]); return e ? e.innerText : '';", css)

    def rect(self, css: str) -> dict[str, float] | None:
        """The element's box on the page (getBoundingClientRect), or None when it is not there."""
        return self.script("const e = document.querySelector(arguments[0]); if (!e) return null; "
                           "const r = e.getBoundingClientRect(); "
                           "return {left: r.left, right: r.right, top: r.top, bottom: r.bottom, width: r.width, "
                           "height: r.height};", css)

    def width(self, pixels: int, height: int = 1900) -> None:
        """The page's viewport, in CSS pixels: emulated through the DevTools protocol, because a headless window
        cannot be made narrower than 500 px (a phone is 390)."""
        self.command("POST", "/goog/cdp/execute", {"cmd": "Emulation.setDeviceMetricsOverride", "params": {
            "width": pixels, "height": height, "deviceScaleFactor": 1, "mobile": pixels < 500}})
        self.viewport = (pixels, height)

    def quit(self) -> None:
        self.command("DELETE", "")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(condition: Callable[[], Any], what: str, timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if value := condition():
                return value
        except OSError:  # chromedriver not listening yet
            pass
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    port = _free_port()
    driver = subprocess.Popen([CHROMEDRIVER, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2).status == 200, "chromedriver")
        web = WebDriver(port)
        try:
            yield web
        finally:
            web.quit()
    finally:
        driver.terminate()
        driver.wait(timeout=30)


def screenshot(browser: WebDriver, folder: Path, name: str, record: Callable[[str, Any], None] | None = None,
               full_page: bool = True) -> Path:
    """Saves a PNG of the page (grown to its full height) under `folder/screenshots`, prints its path, records it as
    the test's `screenshot` property, and copies it to FLAXTUMOR_SCREENSHOT_DIR when that is set."""
    if full_page:
        width, _ = browser.viewport
        height = browser.script("return document.documentElement.scrollHeight")
        browser.width(width, min(int(height) + 50, 8000))
    time.sleep(1.0)  # let the images paint
    png = base64.b64decode(browser.command("GET", "/screenshot"))
    path = folder / "screenshots" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    print(f"screenshot: {path}")
    if record is not None:
        record("screenshot", str(path))
    if keep := os.environ.get("FLAXTUMOR_SCREENSHOT_DIR"):
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(keep) / path.name)
    return path


@pytest.fixture
def shoot(browser: WebDriver, tmp_path: Path, record_property) -> Callable[[str], Path]:
    return lambda name: screenshot(browser, tmp_path, name, record_property)


SET_SLIDER = """
const input = document.querySelector(arguments[0] + ' input[type=range]');
if (!input) return false;
input.value = arguments[1];
input.dispatchEvent(new Event('input', {bubbles: true}));
input.dispatchEvent(new Event('change', {bubbles: true}));
return true;
"""
CLICK_TEXT = ("const b = [...document.querySelectorAll(arguments[0])].find(e => e.innerText.includes(arguments[1])); "
              "b && b.click(); return !!b;")


def set_slider(browser: WebDriver, elem_id: str, value: float) -> None:
    """Moves a Gradio slider as a user would: its range input's value, then the input and change events."""
    assert browser.script(SET_SLIDER, f"#{elem_id}", str(value)), elem_id


def image_src(browser: WebDriver, css: str) -> str:
    return browser.script("const e = document.querySelector(arguments[0] + ' img'); return e ? e.src : '';", css)


def fetch_image(src: str) -> np.ndarray:
    with urllib.request.urlopen(src, timeout=60) as response:
        return np.asarray(Image.open(io.BytesIO(response.read())).convert("RGB"))


def colour_pixels(image: np.ndarray, colour: str) -> int:
    rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
    return int((image == rgb).all(axis=-1).sum())


def wait_new_image(browser: WebDriver, css: str, old: str) -> np.ndarray:
    src = _wait(lambda: (lambda now: now if now and now != old else "")(image_src(browser, css)), f"a new {css} image")
    return fetch_image(src)


def open_app(browser: WebDriver, url: str, width: int = 1400) -> None:
    browser.width(width)
    browser.command("POST", "/url", {"url": url})
    _wait(lambda: "Research use only" in browser.text("#notice"), "the research-use notice")


def upload(browser: WebDriver, elem_id: str, paths: list[Path]) -> None:
    """Gradio keeps the real <input type=file> hidden; WebDriver may still send it paths (strictFileInteractability
    off), one per line for a multiple-file input."""
    field = _wait(lambda: browser.find(f"#{elem_id} input[type=file]"), "the file input")
    browser.command("POST", f"/element/{field}/value", {"text": "\n".join(map(str, paths))})
    # The file list's cells carry the full name (the text shortens long ones and splits off the extension).
    names = f"return [...document.querySelectorAll('#{elem_id} td.filename')].map(e => e.getAttribute('aria-label'))"
    _wait(lambda: {p.name for p in paths} <= set(browser.script(names)), "the upload to finish")


def test_upload_and_predict_in_chromium(browser: WebDriver, served, tmp_path: Path) -> None:
    slice_file = F.good_tiff(tmp_path, "browser_slice.tif", size=96)
    browser.command("POST", "/url", {"url": served[0]})
    _wait(lambda: "Research use only" in browser.text("#notice"), "the research-use notice")

    # Gradio keeps the real <input type=file> hidden; WebDriver may still send it a path (strictFileInteractability off).
    upload = _wait(lambda: browser.find("#slice-file input[type=file]"), "the file input")
    browser.command("POST", f"/element/{upload}/value", {"text": str(slice_file)})
    _wait(lambda: "browser_slice" in browser.text("#slice-file"), "the upload to finish")
    browser.command("POST", f"/element/{browser.find('#slice-button')}/click", {})

    # Both verdicts ("tumour", "no tumour") contain the word; the progress timer shown meanwhile does not.
    _wait(lambda: "tumour" in browser.text("#verdict"), "the verdict")
    _wait(lambda: browser.script("return document.querySelectorAll('img').length >= 2"), "the result images")
    png = screenshot(browser, tmp_path, "app")
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 20_000


def test_example_patient_in_chromium(browser: WebDriver, served) -> None:
    browser.command("POST", "/url", {"url": served[0]})
    _wait(lambda: "Research use only" in browser.text("#notice"), "the research-use notice")
    click_text = "const b = [...document.querySelectorAll(arguments[0])].find(e => e.innerText.includes(arguments[1])); b && b.click(); return !!b;"
    _wait(lambda: browser.script(click_text, "button[role=tab]", "Whole patient"), "the Whole patient tab")
    _wait(lambda: browser.script(click_text, "button", "synthetic_patient.zip"), "the example patient")
    _wait(lambda: "synthetic_patient" in browser.text("#patient-files"), "the example to fill the file input")
    browser.command("POST", f"/element/{browser.find('#patient-button')}/click", {})
    summary = _wait(lambda: "slices" in browser.text("#patient-summary") and browser.text("#patient-summary"), "the summary")
    assert "24 slices" in summary and "Tumour burden" in summary


# ---- issue 13: ground truth, live controls, overlay controls, display defects ----------------------------------------


def _patient_with_most_truth(tiny) -> tuple[Path, int]:
    """The tiny patient folder with the most true tumour pixels, and its slice number (1-based) with the most."""
    from flaxtumor.data.io import read_mask

    best = None
    for folder in sorted(p for p in tiny.data.iterdir() if p.is_dir()):
        areas = {int(m.stem.split("_")[-2]): int(read_mask(m).sum()) for m in folder.glob("*_mask.tif")}
        total = sum(areas.values())
        if best is None or total > best[0]:
            best = (total, folder, max(areas, key=areas.get))
    return best[1], best[2]


def _count_model_calls(monkeypatch, pipeline) -> list[str]:
    """Every call of the two models through the app (the served App holds this very pipeline object)."""
    calls: list[str] = []
    for name in ("tumour_probabilities", "segment"):
        method = getattr(pipeline, name)
        monkeypatch.setattr(pipeline, name, lambda *a, _m=method, _n=name, **k: calls.append(_n) or _m(*a, **k))
    return calls


def test_patient_with_masks_truth_dice_live_threshold_and_opacity(browser: WebDriver, served, pipeline, tiny,
                                                                  tmp_path: Path, shoot, monkeypatch) -> None:
    from flaxtumor.app.render import PREDICTION_COLOUR, TRUTH_COLOUR
    from flaxtumor.data.lgg import discover
    from flaxtumor.evaluate import evaluate_patients

    folder, truth_slice = _patient_with_most_truth(tiny)
    # The Dice `evaluate` reports for this patient, at the app's default point, on the same tiny checkpoints.
    (patient,) = [p for p in discover(tiny.data) if p.patient_id == folder.name]
    result, _ = evaluate_patients(pipeline, [patient], pipeline.point, gallery_size=0)
    expected = result["pipeline"]["per_patient"][folder.name]
    assert served[1].app.pipeline is pipeline
    calls = _count_model_calls(monkeypatch, pipeline)  # from here on, the app's calls only
    archive = F.zip_of(tmp_path / f"{folder.name}.zip", {f"{folder.name}/{p.name}": p.read_bytes()
                                                         for p in folder.iterdir()})  # slices and their masks
    open_app(browser, served[0])
    _wait(lambda: browser.script(CLICK_TEXT, "button[role=tab]", "Whole patient"), "the Whole patient tab")
    upload(browser, "patient-files", [archive])
    browser.command("POST", f"/element/{browser.find('#patient-button')}/click", {})
    summary = _wait(lambda: "Per-patient Dice" in browser.text("#patient-summary") and browser.text("#patient-summary"),
                    "the summary with the per-patient Dice")
    assert sorted(calls) == ["segment", "tumour_probabilities"]  # one call of each model, for the whole patient
    assert f"Per-patient Dice against the uploaded truth: {expected:.4f}" in summary
    assert "per-patient volumetric Dice" in summary  # its protocol, stated beside it

    # The true outline, in its own colour and with its legend entry, on the slice with the most truth.
    old = image_src(browser, "#viewer")
    # Retried: the slider turns interactive with the result, and the first move may come before that.
    _wait(lambda: set_slider(browser, "slice-slider", truth_slice) or time.sleep(1.0) or
          f"Slice {truth_slice}/" in browser.text("#viewer-caption"), "the viewer to move")
    viewer = wait_new_image(browser, "#viewer", old)
    assert colour_pixels(viewer, TRUTH_COLOUR) > 0 and "true tumour (outline)" in browser.text("#viewer-caption")
    shoot("patient_truth_1400")
    browser.width(390)
    shoot("patient_truth_390")
    browser.width(1400)

    # Threshold 0: every slice is called (the tiny segmenter outlines whole slices), re-rendered without the models
    # (the tiny classifier put every slice above 0.5, so the analysis segmented them all).
    set_slider(browser, "threshold", 0)
    _wait(lambda: "threshold 0.00" in browser.text("#patient-summary"), "the summary at threshold 0")
    assert sorted(calls) == ["segment", "tumour_probabilities"]  # no second model call

    # The classifier gate: unticked, the classifier flags no slice and the slider waits; ticked, threshold 0 again.
    range_disabled = "return document.querySelector('#threshold input[type=range]').disabled"
    browser.command("POST", f"/element/{browser.find('#classifier-gate input')}/click", {})
    _wait(lambda: "classifier off" in browser.text("#patient-summary"), "the summary with the classifier off")
    _wait(lambda: browser.script(range_disabled), "the threshold slider to wait")
    browser.command("POST", f"/element/{browser.find('#classifier-gate input')}/click", {})
    _wait(lambda: "threshold 0.00" in browser.text("#patient-summary"), "the summary with the classifier back on")
    _wait(lambda: not browser.script(range_disabled), "the threshold slider back")
    assert sorted(calls) == ["segment", "tumour_probabilities"]

    # Opacity: 1 paints the prediction in its colour, 0 hides it; the truth toggle hides the outline.
    old = image_src(browser, "#viewer")
    set_slider(browser, "opacity", 1)
    opaque = wait_new_image(browser, "#viewer", old)
    assert colour_pixels(opaque, PREDICTION_COLOUR) > 0.8 * opaque.shape[0] * opaque.shape[1]
    old = image_src(browser, "#viewer")
    set_slider(browser, "opacity", 0)
    clear = wait_new_image(browser, "#viewer", old)
    assert colour_pixels(clear, PREDICTION_COLOUR) == 0 and colour_pixels(clear, TRUTH_COLOUR) > 0
    assert "prediction hidden" in browser.text("#viewer-caption")
    old = image_src(browser, "#viewer")
    browser.command("POST", f"/element/{browser.find('#show-truth input')}/click", {})
    hidden = wait_new_image(browser, "#viewer", old)
    assert colour_pixels(hidden, TRUTH_COLOUR) == 0 and "truth hidden" in browser.text("#viewer-caption")
    assert sorted(calls) == ["segment", "tumour_probabilities"]
    shoot("patient_live_controls_1400")


def test_display_defects_are_fixed_at_1400_and_390(browser: WebDriver, served, tmp_path: Path, shoot) -> None:
    for width in (1400, 390):
        open_app(browser, served[0], width)
        # Before any analysis the numbers read "–", not 0; a short how-to is there.
        _wait(lambda: "Tumour probability" in browser.text("#slice-figures"), "the figures")
        assert "–" in browser.text("#slice-figures") and "0" not in browser.text("#slice-figures")
        assert "How to use" in browser.text("#how-to")
        # The upload's label is text above the drop zone, not under its icons.
        label = browser.script("const e = document.querySelector('#slice-file'); "
                               "return e.closest('.column, .col').querySelector('.field-label').getBoundingClientRect()"
                               ".bottom;")
        assert label <= browser.rect("#slice-file")["top"] + 1
        shoot(f"start_{width}")

        upload(browser, "slice-file", [F.good_tiff(tmp_path, f"slice_{width}.tif", size=96)])
        browser.command("POST", f"/element/{browser.find('#slice-button')}/click", {})
        _wait(lambda: image_src(browser, "#overlay") and image_src(browser, "#gradcam"), "the result images")
        _wait(lambda: "–" not in browser.text("#slice-figures"), "the numbers")
        overlay, gradcam = browser.rect("#overlay img"), browser.rect("#gradcam img")
        assert abs(overlay["width"] - gradcam["width"]) <= 1 and abs(overlay["height"] - gradcam["height"]) <= 1
        caption = browser.rect("#overlay-caption")
        assert caption["bottom"] <= browser.rect("#overlay img")["top"]  # the caption does not cover the image
        shoot(f"slice_{width}")

        # A slice with nothing outlined has no "predicted tumour" chip.
        set_slider(browser, "threshold", 1)
        _wait(lambda: "no tumour predicted" in browser.text("#overlay-caption"), "the no-tumour legend")
        assert "predicted tumour" not in browser.text("#overlay-caption").replace("no tumour predicted", "")
        assert not browser.script("return document.querySelectorAll('#overlay-caption .legend-chip').length")

        # One slice is "1 slice"; the table shows short names and "% of brain" stays on screen.
        _wait(lambda: browser.script(CLICK_TEXT, "button[role=tab]", "Whole patient"), "the Whole patient tab")
        archive = F.zip_of(tmp_path / f"one_{width}.zip", {"TCGA_Q/TCGA_Q_1.png": F.png_bytes(F.slice_array())})
        upload(browser, "patient-files", [archive])
        browser.command("POST", f"/element/{browser.find('#patient-button')}/click", {})
        summary = _wait(lambda: "slice" in browser.text("#patient-summary") and browser.text("#patient-summary"),
                        "the summary")
        assert "1 patient, 1 slice**" not in summary and "1 patient, 1 slice;" in summary.replace("\n", " ")
        assert "1 slices" not in summary
        table = browser.text("#patient-table")
        assert "TCGA_Q_1.png" in table and f"one_{width}.zip/" not in table
        if width == 1400:
            header = browser.script("const h = [...document.querySelectorAll('#patient-table th')]"
                                    ".find(e => e.innerText.includes('tumour_pct_of_brain')); "
                                    "return h ? h.getBoundingClientRect().right : null;")
            assert header is not None and header <= browser.script("return window.innerWidth")
        shoot(f"patient_{width}")

"""A real browser: Debian's headless chromium, driven by chromedriver over plain W3C WebDriver HTTP (no selenium or
playwright dependency), loads the app, uploads a slice through the page, runs the prediction and saves a screenshot.

Needs `apt-get install -y chromium chromium-driver` (.ci/run installs both); skips with that reason otherwise.
Set FLAXTUMOR_SCREENSHOT_DIR to keep the screenshot.
"""

from __future__ import annotations

import base64
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

import pytest

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
    time.sleep(1.0)  # let the images paint before the screenshot
    png = base64.b64decode(browser.command("GET", "/screenshot"))
    assert png.startswith(b"\x89PNG") and len(png) > 20_000
    (tmp_path / "app.png").write_bytes(png)
    if keep := os.environ.get("FLAXTUMOR_SCREENSHOT_DIR"):
        Path(keep).mkdir(parents=True, exist_ok=True)
        (Path(keep) / "app.png").write_bytes(png)


def test_example_patient_in_chromium(browser: WebDriver, served) -> None:
    browser.command("POST", "/url", {"url": served[0]})
    _wait(lambda: "Research use only" in browser.text("#notice"), "the research-use notice")
    click_text = "const b = [...document.querySelectorAll(arguments[0])].find(e => e.innerText.includes(arguments[1])); b && b.click(); return !!b;"
    assert browser.script(click_text, "button[role=tab]", "Whole patient")
    _wait(lambda: browser.script(click_text, "button", "synthetic_patient.zip"), "the example patient")
    _wait(lambda: "synthetic_patient" in browser.text("#patient-files"), "the example to fill the file input")
    browser.command("POST", f"/element/{browser.find('#patient-button')}/click", {})
    summary = _wait(lambda: "slices" in browser.text("#patient-summary") and browser.text("#patient-summary"), "the summary")
    assert "24 slices" in summary and "Tumour burden" in summary

"""Issue 14 through the running app: every crafted file and request is refused with a clear message (escaped, without
server paths or exception classes) and the server then answers a good request; outputs are private; examples are
exact files; unused uploads are deleted; nothing is left behind by gr.File."""

from __future__ import annotations

import os
import re
import stat
import urllib.error
import urllib.request
from pathlib import Path

import httpx
import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError

from flaxtumor import app_state
from tests.ui import files as F


def _refusal(call) -> str:
    with pytest.raises(AppError) as e:
        call()
    message = str(e.value)
    assert "Traceback" not in message and not re.search(r"\b[A-Z]\w*(Error|Exception)\b", message), message
    assert str(app_state.private_root()) not in message and "/tmp/" not in message, message
    return message


def _good_slice(client, files: Path) -> None:
    verdict, *_ = client.predict(handle_file(str(F.good_png(files, "good.png"))), 0.0, False, api_name="/predict_slice")
    assert verdict["label"] == "tumour"


@pytest.mark.parametrize("case", F.CRAFTED_SINGLE)
def test_crafted_slices_are_refused_and_the_app_stays_up(client, files: Path, case: str) -> None:
    (path,), expected = F.crafted(files, case)
    message = _refusal(lambda: client.predict(handle_file(str(path)), 0.5, False, api_name="/predict_slice"))
    assert expected in message
    _good_slice(client, files)


@pytest.mark.parametrize("case", F.CRAFTED_PATIENT)
def test_crafted_patients_are_refused_and_the_app_stays_up(client, files: Path, case: str) -> None:
    paths, expected = F.crafted(files, case)
    message = _refusal(lambda: client.predict([handle_file(str(p)) for p in paths], 0.5, False, None, None,
                                              api_name="/predict_patient"))
    assert expected in message
    assert "<a " not in message and "<img" not in message  # names are text in the HTML pop-up
    table = client.predict([handle_file(str(F.good_png(files)))], 0.5, False, None, None, api_name="/predict_patient")[1]
    assert len(table["data"]) == 1


@pytest.mark.parametrize(
    "spacing, thickness, expected",
    [
        (1e308, 2.0, "Pixel spacing: must lie in (0, 10] mm (got 1e+308)"),
        (10**30, 2.0, "Pixel spacing: must lie in (0, 10] mm"),
        (-1, 2.0, "Pixel spacing: must lie in (0, 10] mm (got -1"),
        (0.5, 1e6, "Slice thickness: must lie in (0, 50] mm"),
        (0.5, "abc", "Slice thickness: expected a number (got abc)"),
    ],
)
def test_number_fields_are_validated_by_name(client, files: Path, spacing, thickness, expected: str) -> None:
    good = handle_file(str(F.good_png(files)))
    message = _refusal(lambda: client.predict([good], 0.5, False, spacing, thickness, api_name="/predict_patient"))
    assert expected in message
    summary = client.predict([good], 0.5, False, 0.5, 2.0, api_name="/predict_patient")[0]
    assert "mm³" in summary


@pytest.mark.parametrize("threshold, lcc, expected", [
    (5, False, "Classification threshold: must lie in [0, 1]"),
    (-0.1, False, "Classification threshold: must lie in [0, 1]"),
    (0.5, "yes", "Post-processing: expected one of none, largest_component"),
])
def test_threshold_and_switch_are_validated(client, files: Path, threshold, lcc, expected: str) -> None:
    path = handle_file(str(F.good_png(files)))
    assert expected in _refusal(lambda: client.predict(path, threshold, lcc, api_name="/predict_slice"))
    _good_slice(client, files)


def _modes(root: Path) -> dict[str, int]:
    return {str(p): stat.S_IMODE(p.lstat().st_mode) for p in [root, *root.rglob("*")]}


def test_files_the_app_writes_are_private(client, served, tiny, files: Path) -> None:
    """The permission test: after slice and patient requests, nothing under the app's root (Gradio's uploads and
    cached outputs included) is readable, writable or listable by group or others."""
    root = app_state.private_root()
    assert os.environ["GRADIO_TEMP_DIR"] == str(root / "gradio")
    _good_slice(client, files)
    patient = sorted(p for p in tiny.data.iterdir() if p.is_dir())[0]
    archive = F.zip_of(files / "patient.zip", {f"{patient.name}/{p.name}": p.read_bytes() for p in patient.iterdir()})
    *_, masks_zip = client.predict([handle_file(str(archive))], 0.0, True, None, None, api_name="/predict_patient")
    modes = _modes(root)
    assert modes[str(root)] == 0o700
    assert len(modes) > 10 and any(p.endswith("_masks.zip") for p in modes) and any("/gradio/" in p for p in modes)
    leaky = {p: oct(m) for p, m in modes.items() if m & 0o077}
    assert not leaky


def test_examples_are_fresh_and_only_exact_files_are_served(served) -> None:
    url, demo = served
    app = demo.app
    examples = [*app.examples.slices.values(), *app.examples.patients]
    assert examples and all(p.parent == app_state.private_root() / "examples" for p in examples)
    planted = examples[0].parent / "notes.html"
    planted.write_text("<script>alert(1)</script>")
    try:
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"{url}gradio_api/file={planted}", timeout=30)
        with urllib.request.urlopen(f"{url}gradio_api/file={app.examples.patients[0]}", timeout=30) as response:
            assert response.status == 200
    finally:
        planted.unlink()


def _upload(url: str, path: Path) -> str:
    response = httpx.post(f"{url}gradio_api/upload", files=[("files", (path.name, path.read_bytes()))], timeout=30)
    response.raise_for_status()
    return response.json()[0]


def test_unused_and_refused_uploads_are_deleted(client, served, files: Path) -> None:
    url, demo = served
    janitor = demo.app.janitor
    parked = _upload(url, F.good_png(files, "parked.png"))
    assert Path(parked).is_file() and parked in demo.blocks.upload_file_set
    janitor.sweep(unused_s=3600)
    assert Path(parked).is_file()  # young uploads wait for their request
    janitor.sweep(unused_s=0)
    assert not Path(parked).exists() and parked not in demo.blocks.upload_file_set

    used = _upload(url, F.good_png(files, "used.png"))
    refused = _upload(url, F.bad_upload(files, "truncated_png")[0][0])
    client.predict({"path": used, "meta": {"_type": "gradio.FileData"}}, 0.5, False, api_name="/predict_slice")
    with pytest.raises(AppError):
        client.predict({"path": refused, "meta": {"_type": "gradio.FileData"}}, 0.5, False, api_name="/predict_slice")
    assert not Path(refused).exists()  # a refused upload is useless: deleted at once
    janitor.sweep(unused_s=0)
    assert Path(used).is_file()  # kept for a re-run with another threshold, until Gradio's cache sweep


def test_gradio_file_leaves_no_empty_temp_files(client, files: Path) -> None:
    cache = Path(os.environ["GRADIO_TEMP_DIR"])
    before = {p for p in cache.iterdir() if p.is_file()}
    client.predict([handle_file(str(F.good_png(files)))], 0.5, False, None, None, api_name="/predict_patient")
    _good_slice(client, files)
    assert {p for p in cache.iterdir() if p.is_file()} == before


def test_patient_results_are_browsed_from_disk(client, served, tiny, files: Path) -> None:
    """Session state holds a token; the viewer reads thumbnails and packed masks from the analysis' private folder."""
    from flaxtumor.app.render import Display

    app = served[1].app
    before = set(app.store._entries)
    paths = [F.good_png(files, f"s_{i}.png", 96) for i in range(3)]
    client.predict([handle_file(str(p)) for p in paths], 0.0, False, None, None, api_name="/predict_patient")
    (token,) = set(app.store._entries) - before
    assert app.store.get(token).folder.parent == app.store.root and app.store.root.parent == app_state.private_root()
    view = app.view(token, 0.0, "none", Display(), 2)
    assert "Slice 2/3: s_1.png" in view.caption and view.image.shape == (384, 384, 3)
    with pytest.raises(Exception, match="expired"):
        app.view("no-such-token", 0.0, "none", Display(), 1)


def test_names_in_markdown_are_code_spans(client, files: Path) -> None:
    """A file name with Markdown link syntax is shown as text in the details panel, not as a link."""
    from flaxtumor.app_errors import md_code

    name = "[log in again](evil.example)_1.png"  # Gradio strips ":" from uploaded names
    details = client.predict(handle_file(str(F.good_png(files, name))), 0.5, False, api_name="/predict_slice")[-1]
    assert "\n\n" + md_code(name) + ":" in details  # its own paragraph, after the verdict's meaning
    assert details.count(name) == 1

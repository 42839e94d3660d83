"""The app's bounded state and its client-facing text, without a server: the slice browser store (TTL, capacity,
byte cap, thumbnails), escaping, number fields and errors that never show server details."""

from __future__ import annotations

import time
from pathlib import Path

import gradio as gr
import numpy as np
import pytest

from flaxtumor.app_errors import UNEXPECTED, bool_field, escape, md_code, number_field, scrub, user_errors
from flaxtumor.app_state import BrowserStore, private_root
from flaxtumor.uploads import UploadError
from tests.ui import files as F


def _patient(n: int, side: int = 64) -> tuple[list[str], list[np.ndarray], list[np.ndarray], list[float]]:
    masks = [np.zeros((side, side), bool) for _ in range(n)]
    for m in masks:
        m[: side // 2] = True
    return [f"s_{i}.png" for i in range(n)], [F.slice_array(side, i) for i in range(n)], masks, [0.1 * i for i in range(n)]


def test_browser_keeps_thumbnails_on_disk_not_arrays(tmp_path: Path) -> None:
    store = BrowserStore(root=tmp_path, side=128)
    token = store.put(*_patient(3, side=512))
    shown = store.get(token, 7)  # clipped to the last slice
    assert (shown.index, shown.count, shown.name) == (2, 3, "s_2.png") and shown.probability == pytest.approx(0.2)
    assert shown.image.shape == (128, 128, 3) and shown.image.dtype == np.uint8 and shown.mask.shape == (128, 128)
    assert sorted(p.name for p in (tmp_path / token).iterdir())[:2] == ["0000_image.npy", "0000_mask.npy"]
    assert shown.mask[:64].all() and not shown.mask[64:].any()
    entry = store._entries[token]
    assert not any(isinstance(v, np.ndarray) for v in vars(entry).values())  # only names, probabilities, a folder
    store.release(token)
    assert store.get(token, 0) is None and not any(tmp_path.iterdir())


def test_browser_entries_expire_and_are_capped(tmp_path: Path) -> None:
    store = BrowserStore(root=tmp_path, ttl_s=0.2, capacity=2)
    first = store.put(*_patient(1))
    time.sleep(0.3)
    assert store.get(first, 0) is None  # expired: the viewer says so instead of showing stale data
    tokens = [store.put(*_patient(1)) for _ in range(3)]
    assert len(store) == 2 and store.get(tokens[0], 0) is None and store.get(tokens[2], 0) is not None
    assert len(list(tmp_path.iterdir())) == 2  # folders of dropped entries are deleted with them

    capped = BrowserStore(root=tmp_path / "capped", max_bytes=1)
    (tmp_path / "capped").mkdir(exist_ok=True)
    capped_token = capped.put(*_patient(2))
    assert len(capped) == 0 and capped.get(capped_token, 0) is None
    assert store.get(None, 0) is None and store.get(["not", "a", "token"], 0) is None


def test_private_root_is_owner_only() -> None:
    root = private_root()
    assert root.stat().st_mode & 0o777 == 0o700 and root.name.startswith("flaxtumor-app-")
    probe = root / "probe.txt"
    probe.write_text("x")  # the process umask (077) applies to every file written from now on
    assert probe.stat().st_mode & 0o077 == 0
    probe.unlink()


def test_user_strings_are_escaped() -> None:
    assert escape(F.HTML_NAME).startswith("&lt;a href=\"https://evil.example\"&gt;") and "<img" not in escape(F.HTML_NAME)
    assert md_code("a_b.tif") == "` a_b.tif `"
    assert md_code("x`` [y](http://z)") == "``` x`` [y](http://z) ```"  # no run of backticks in it can close the span


def _raises(exc: BaseException):
    def fn() -> None:
        raise exc

    return user_errors(fn)


def test_unexpected_errors_are_reported_in_words_and_logged(capsys) -> None:
    secret = f"{private_root()}/gradio/abc/x.png"
    with pytest.raises(gr.Error) as e:
        _raises(RuntimeError(f"cannot identify image file {secret!r}"))()
    assert e.value.message == UNEXPECTED + "an unexpected problem on the server (it has been logged)."
    assert "RuntimeError" in capsys.readouterr().err  # the traceback goes to the server log
    with pytest.raises(gr.Error, match="ran out of memory"):
        _raises(MemoryError())()
    with pytest.raises(gr.Error) as e:  # a refusal that names a server path by mistake is scrubbed, then escaped
        _raises(UploadError(f"<b>x.png</b>: cannot read {secret}"))()
    assert e.value.message == "&lt;b&gt;x.png&lt;/b&gt;: cannot read &lt;server path&gt;"
    assert scrub("members '/tmp/evil.png'") == "members '/tmp/evil.png'"  # the user's own text stays


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 1e308, 10**400, True, [1], "1,5"])
def test_number_fields_refuse_what_is_not_a_finite_number_in_range(value) -> None:
    with pytest.raises(UploadError, match=r"^Pixel spacing: (must|expected)"):
        number_field(value, "Pixel spacing", 0.0, 10.0, "mm")


def test_number_fields_accept_numbers_and_blanks() -> None:
    assert number_field("0.5", "Pixel spacing", 0.0, 10.0) == 0.5 and number_field(10, "Pixel spacing", 0.0, 10.0) == 10.0
    assert number_field(None, "x", 0.0, 1.0) is None and number_field(" ", "x", 0.0, 1.0) is None
    assert number_field(0, "x", 0.0, 1.0, zero_is_unset=True) is None
    assert number_field(0, "x", 0.0, 1.0, include_low=True) == 0.0
    with pytest.raises(UploadError, match=r"must lie in \(0, 1\]"):
        number_field(0, "x", 0.0, 1.0)
    assert bool_field(None, "x") is False and bool_field(True, "x") is True
    with pytest.raises(UploadError, match="expected true or false"):
        bool_field("false", "x")


def test_housekeeping_runs_the_sweeps_until_stopped() -> None:
    from flaxtumor.app_state import Housekeeping

    calls: list[int] = []
    keeper = Housekeeping(lambda: calls.append(1), lambda: 1 / 0, period_s=0.05)  # a failing sweep stops nothing
    keeper.start()
    time.sleep(0.4)
    keeper.stop()
    seen = len(calls)
    time.sleep(0.2)
    assert seen >= 3 and len(calls) <= seen + 1


def test_janitor_deletes_only_recorded_uploads_no_other_request_used(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from flaxtumor.app_state import UploadJanitor

    for folder in ("s", "u", "f"):
        (tmp_path / folder).mkdir()
    shared, alone, foreign = (F.good_png(tmp_path / folder, "a.png") for folder in ("s", "u", "f"))
    janitor = UploadJanitor()
    janitor.blocks = SimpleNamespace(upload_file_set={str(shared), str(alone)})  # `foreign` was never uploaded
    janitor.use([shared])  # another user's request with the same content (Gradio stores uploads by content)
    janitor.use([shared, alone, foreign])
    janitor.discard([shared, alone, foreign])
    assert shared.exists() and not alone.exists() and foreign.exists()
    assert not (tmp_path / "u").exists()  # the upload's own folder goes with it

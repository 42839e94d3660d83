"""The app's bounded state and its client-facing text, without a server: the analysis store (TTL, capacity, byte cap,
packed masks and thumbnails on disk), the final-mask memo, escaping, number fields and errors that never show server
details."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import gradio as gr
import numpy as np
import pytest

from flaxtumor.app_errors import UNEXPECTED, bool_field, escape, md_code, number_field, scrub, user_errors
from flaxtumor.app.cache import AnalysisStore, Expired, FinalMasks, NewVolume, Volume
from flaxtumor.app_state import private_root
from flaxtumor.uploads import UploadError
from tests.ui import files as F


def _volume(n: int, side: int = 64, truth: bool = False) -> NewVolume:
    masks = np.zeros((n, side, side), bool)
    masks[:, : side // 2] = True
    names = tuple(f"s_{i}.png" for i in range(n))
    volume = Volume("p", names, (side, side), tuple(0.1 * i for i in range(n)), (True,) * n if truth else None)
    return NewVolume(volume, [F.slice_array(side, i) for i in range(n)], masks, ~masks, masks if truth else None)


def test_analyses_keep_packed_masks_and_thumbnails_on_disk_not_arrays(tmp_path: Path) -> None:
    store = AnalysisStore(root=tmp_path, side=128)
    token = store.put("patient", [_volume(3, side=512, truth=True)])
    analysis = store.get(token)
    assert analysis.count == 3 and analysis.locate(7) == (0, 2)  # clipped to the last slice
    thumb = analysis.thumbnail(0, 2)
    assert thumb.shape == (128, 128, 3) and thumb.dtype == np.uint8
    raw = analysis.raw(0)
    assert raw.shape == (3, 512, 512) and raw[:, :256].all() and not raw[:, 256:].any()
    assert (analysis.brain(0) == ~raw).all() and (analysis.truth(0) == raw).all()
    assert sorted(p.name for p in (tmp_path / token).iterdir()) == ["0_brain.npy", "0_raw.npy", "0_thumbs.npy",
                                                                    "0_truth.npy"]
    assert (tmp_path / token / "0_raw.npy").stat().st_size < 3 * 512 * 512 / 8 + 1024  # one bit a pixel
    entry = store._entries[token]
    assert not any(isinstance(v, np.ndarray) for v in vars(entry).values())
    store.release(token)
    with pytest.raises(Expired):
        store.get(token)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("side", [64, 16])  # thumbnails as large as the slices, and smaller
def test_unsegmented_slices_stay_readable_until_their_masks_are_added(tmp_path: Path, side: int) -> None:
    store = AnalysisStore(root=tmp_path, side=side)
    new = _volume(3, side=32)
    new.raw[1] = False  # the segmenter did not run on slice 1
    analysis = store.get(store.put("patient", [dataclasses.replace(new, segmented=np.array([True, False, True]))]))
    assert analysis.segmented(0).tolist() == [True, False, True]
    assert np.array_equal(analysis.images(0), np.stack(new.images))  # the slices themselves, never thumbnails
    assert (tmp_path / analysis.token / "0_images.npy").exists() == (side < 32)  # stored only when thumbnails shrink
    analysis.add_masks(0, np.array([False, True, False]), np.ones((1, 32, 32), bool))
    assert analysis.segmented(0).all() and analysis.raw(0)[1].all()
    assert (analysis.raw(0)[[0, 2]] == new.raw[[0, 2]]).all()  # the others untouched
    whole = store.get(store.put("patient", [new]))  # segmented on every slice: nothing more is stored
    assert whole.segmented(0).all() and not (tmp_path / whole.token / "0_segmented.npy").exists()


def test_analyses_expire_and_are_capped(tmp_path: Path) -> None:
    store = AnalysisStore(root=tmp_path, ttl_s=0.2, capacity=2)
    first = store.put("slice", [_volume(1)])
    time.sleep(0.3)
    with pytest.raises(Expired):  # the app says so instead of showing stale data
        store.get(first)
    tokens = [store.put("slice", [_volume(1)]) for _ in range(3)]
    assert len(store) == 2 and store.get(tokens[2]) is not None
    with pytest.raises(Expired):
        store.get(tokens[0])
    assert len(list(tmp_path.iterdir())) == 2  # folders of dropped entries are deleted with them

    (tmp_path / "capped").mkdir()
    capped = AnalysisStore(root=tmp_path / "capped", max_bytes=1)
    capped_token = capped.put("slice", [_volume(2)])
    assert len(capped) == 0
    for token in (capped_token, None, ["not", "a", "token"]):
        with pytest.raises(Expired):
            capped.get(token)


def test_final_masks_are_gate_and_postprocess_of_the_raw_outputs_and_memoised(tmp_path: Path, monkeypatch) -> None:
    from flaxtumor.operating_point import OperatingPoint, gate_and_postprocess

    store = AnalysisStore(root=tmp_path)
    analysis = store.get(store.put("patient", [_volume(4)]))
    finals = FinalMasks(max_bytes=10**9)
    point = OperatingPoint(threshold=0.15, postprocess="largest_component")
    calls, final = finals(analysis, 0, point)
    expected = gate_and_postprocess(np.float32([0.0, 0.1, 0.2, 0.3]), analysis.raw(0), point)
    assert (calls == expected[0]).all() and (final == expected[1]).all() and calls.tolist() == [False, False, True, True]
    reads = []
    monkeypatch.setattr("flaxtumor.app.cache.gate_and_postprocess", lambda *a: reads.append(a) or expected)
    assert (finals(analysis, 0, point)[1] == final).all() and not reads  # memoised
    finals(analysis, 0, OperatingPoint(threshold=0.5))
    assert len(reads) == 1
    tiny = FinalMasks(max_bytes=1)  # over its cap it keeps only the latest
    tiny(analysis, 0, point), tiny(analysis, 0, OperatingPoint())
    assert len(tiny._memo) == 1
    finals.forget(analysis.token)
    assert not finals._memo


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

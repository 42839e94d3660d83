"""The Gradio monkeypatches are still needed: this fails when Gradio moves past the version they were written for, or
when upstream's code no longer has the bug a patch works around (then delete that patch)."""

from __future__ import annotations

import importlib
import inspect

import gradio as gr

from flaxtumor.app import gradio_patches


def _upstream(dotted: str):
    if dotted == "gradio.processing_utils.save_pil_to_cache":
        fn = importlib.import_module("gradio.processing_utils").save_pil_to_cache
        return getattr(fn, "flaxtumor_original", fn)  # the original, even once patched in this process
    if dotted == "gradio.File._process_single_file":
        return gr.File._process_single_file  # patched per instance, never on the class
    raise AssertionError(f"unknown upstream function {dotted}")


def test_gradio_is_the_version_the_patches_target():
    assert gr.__version__ == gradio_patches.TARGET_VERSION, (
        f"gradio {gr.__version__}: re-check every patch in flaxtumor/app/gradio_patches.py (written for "
        f"{gradio_patches.TARGET_VERSION}), then update TARGET_VERSION")


def test_upstream_still_has_the_bugs_the_patches_work_around():
    for patch, (dotted, bug) in gradio_patches.UPSTREAM_BUGS.items():
        source = inspect.getsource(_upstream(dotted))
        assert bug in source, f"{dotted} no longer contains {bug!r}: upstream may have fixed it; remove {patch}()"


def test_patches_apply_once_and_keep_the_contract(tmp_path):
    from gradio import processing_utils
    from PIL import Image

    gradio_patches.atomic_image_cache()
    gradio_patches.atomic_image_cache()  # idempotent
    patched = processing_utils.save_pil_to_cache
    assert patched.flaxtumor_atomic and not getattr(patched.flaxtumor_original, "flaxtumor_atomic", False)
    path = patched(Image.new("RGB", (4, 4)), str(tmp_path), name="x", format="png")
    assert path.endswith("x.png") and not [p for p in tmp_path.rglob(".x.*")]  # no staging file left

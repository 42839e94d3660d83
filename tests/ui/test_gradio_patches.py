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
    if dotted == "gradio.Blocks.get_api_info":
        return gr.Blocks.get_api_info  # patched per instance, never on the class
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


def test_function_defaults_give_an_omitted_parameter_the_functions_default():
    def endpoint(text: str, flag: bool | None = None, size: float = 2.0):
        return text

    with gr.Blocks() as blocks:
        text, flag, size = gr.Textbox(value="start"), gr.Checkbox(value=False), gr.Number(value=1.0)
        gr.Button().click(endpoint, [text, flag, size], text, api_name="endpoint")

    def defaults() -> list:
        return [p["parameter_default"] for p in blocks.get_api_info()["named_endpoints"]["/endpoint"]["parameters"]]

    assert defaults() == ["start", False, 1.0]  # Gradio's: the components' initial values
    gradio_patches.function_defaults(blocks)
    gradio_patches.function_defaults(blocks)  # idempotent
    assert defaults() == ["start", None, 2.0]  # the function's, where it declares one
    assert "page" in inspect.signature(blocks.get_api_info).parameters  # Gradio checks for it

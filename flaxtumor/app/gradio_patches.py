"""Every monkeypatch the app applies to Gradio, in one module, for the Gradio version they were written against.

- `atomic_image_cache()`: Gradio saves output images to a content-addressed cache path with a plain `write_bytes`, so
  two requests with identical results (two users on one example) rewrite a file while it is being downloaded, and
  the download is cut short (found by tests/ui/test_load.py). Writing to a temp name and renaming keeps every reader
  on a complete file.
- `no_stray_temp_files(component)`: `gr.File` creates an empty `NamedTemporaryFile` in its cache for every file it
  hands to a function, and never deletes it; the path it returns is the upload itself. Same result without the file.
- `function_defaults(blocks)`: Gradio gives an API parameter its component's initial value as the default (the value
  `gradio_client` and `/call/v2` send when a client omits it), not the endpoint function's. The classifier-gate
  checkbox starts unticked when the shipped point has the classifier off, so a client that knows nothing of the gate
  and passes a threshold would have it silently ignored; with the function's default (None: "as the threshold says")
  it applies, as it did before the gate existed.

`tests/ui/test_gradio_patches.py` fails when Gradio is upgraded past `TARGET_VERSION` or when upstream's code no
longer has the bug a patch works around: then re-check, and delete the patch that is no longer needed.
"""

from __future__ import annotations

import functools
import inspect
import os
import tempfile
from pathlib import Path

import gradio as gr
from PIL import Image

TARGET_VERSION = "6.31.0"  # the gradio pin these patches were written and tested against
# What upstream's code does that each patch works around; the test checks it is still there.
UPSTREAM_BUGS = {
    "atomic_image_cache": ("gradio.processing_utils.save_pil_to_cache", ".write_bytes(bytes_data)"),
    "no_stray_temp_files": ("gradio.File._process_single_file", "tempfile.NamedTemporaryFile(delete=False"),
    "function_defaults": ("gradio.Blocks.get_api_info", 'parameter_default = component["props"]["value"]'),
}


def atomic_image_cache() -> None:
    """Replaces `gradio.processing_utils.save_pil_to_cache` with a write-then-rename version (idempotent)."""
    from gradio import processing_utils

    if getattr(processing_utils.save_pil_to_cache, "flaxtumor_atomic", False):
        return

    def save_pil_to_cache(img: Image.Image, cache_dir: str, name: str = "image", format: str = "webp") -> str:
        data = processing_utils.encode_pil_to_bytes(img, format)
        folder = Path(cache_dir) / processing_utils.hash_bytes(data)
        folder.mkdir(exist_ok=True, parents=True)
        path = (folder / f"{name}.{format}").resolve()
        fd, staging = tempfile.mkstemp(dir=folder, prefix=f".{name}.")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(staging, path)
        return str(path)

    save_pil_to_cache.flaxtumor_atomic = True  # type: ignore[attr-defined]
    save_pil_to_cache.flaxtumor_original = processing_utils.save_pil_to_cache  # type: ignore[attr-defined]
    processing_utils.save_pil_to_cache = save_pil_to_cache


def no_stray_temp_files(component: gr.File) -> gr.File:
    """`component` (a filepath `gr.File` without file-type filter) hands over upload paths without the stray file."""
    from gradio.utils import NamedString

    assert component.type == "filepath" and not component.file_types  # the only case this replaces
    component._process_single_file = lambda f: NamedString(f.path)  # type: ignore[method-assign]
    return component


def function_defaults(blocks: gr.Blocks) -> gr.Blocks:
    """`blocks`' named endpoints default each parameter to its function's declared default, where there is one; the
    others keep Gradio's (the component's initial value). Idempotent; patches this instance only."""
    original = blocks.get_api_info
    if getattr(original, "flaxtumor_function_defaults", False):
        return blocks

    @functools.wraps(original)  # keeps the signature: Gradio inspects it for `page`
    def get_api_info(*args: object, **kwargs: object) -> object:
        info = original(*args, **kwargs)
        for fn in blocks.fns.values():
            endpoint = info["named_endpoints"].get(f"/{fn.api_name}") if fn.fn and fn.api_name else None
            if endpoint is None:
                continue
            declared = inspect.signature(fn.fn).parameters  # through functools.wraps to the endpoint function
            for parameter in endpoint["parameters"]:
                own = declared.get(parameter.get("parameter_name", ""))
                if own is not None and own.default is not inspect.Parameter.empty:
                    parameter["parameter_has_default"], parameter["parameter_default"] = True, own.default
        return info

    get_api_info.flaxtumor_function_defaults = True  # type: ignore[attr-defined]
    blocks.get_api_info = get_api_info  # type: ignore[method-assign]
    return blocks

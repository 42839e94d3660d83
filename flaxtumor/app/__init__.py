"""The Gradio app's package. So far it holds `gradio_patches` (every monkeypatch of Gradio, in one place); the UI
itself is still `flaxtumor.ui`, with `flaxtumor.uploads`, `flaxtumor.app_state` and `flaxtumor.app_errors`."""

"""Moved to the `flaxtumor.app` package (`flaxtumor.app.ui` builds the Gradio app); this name is that module, for
existing imports."""

import sys

from flaxtumor.app import ui as _module

sys.modules[__name__] = _module

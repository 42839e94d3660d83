"""Moved to `flaxtumor.app.state`; this name is the same module, for existing imports."""

import sys

from flaxtumor.app import state as _module

sys.modules[__name__] = _module

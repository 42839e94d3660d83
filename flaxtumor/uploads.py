"""Moved to `flaxtumor.app.uploads`; this name is the same module, for existing imports."""

import sys

from flaxtumor.app import uploads as _module

sys.modules[__name__] = _module

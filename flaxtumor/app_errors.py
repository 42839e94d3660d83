"""Moved to `flaxtumor.app.errors`; this name is the same module, for existing imports."""

import sys

from flaxtumor.app import errors as _module

sys.modules[__name__] = _module

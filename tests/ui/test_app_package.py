"""The app package stays readable: no function over 80 lines; the old module names are the moved modules."""

from __future__ import annotations

import ast
from pathlib import Path

APP = Path(__file__).resolve().parents[2] / "flaxtumor" / "app"
MAX_LINES = 80


def test_no_function_in_the_app_package_is_over_80_lines():
    long = []
    for path in sorted(APP.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    long.append(f"{path.name}:{node.name} ({lines} lines)")
    assert not long, long


def test_old_module_names_are_the_moved_modules():
    import flaxtumor.app_errors
    import flaxtumor.app_state
    import flaxtumor.ui
    import flaxtumor.uploads
    from flaxtumor.app import errors, state, ui, uploads

    assert (flaxtumor.ui, flaxtumor.uploads, flaxtumor.app_state, flaxtumor.app_errors) == (ui, uploads, state, errors)

"""What the app says to clients: escaped user strings, validated number fields, and errors without server details.

- File and member names are user-controlled: Gradio renders error pop-ups as HTML and Markdown as Markdown + HTML, so
  every name is escaped (`escape` for pop-ups, `md_code` for Markdown).
- No client-facing message carries a server path or an exception's class name. A refused upload says what is wrong
  with it; anything unexpected says "The upload could not be analysed: <what, in words>" and its traceback goes to the
  server log (stderr) only.
"""

from __future__ import annotations

import errno
import functools
import html
import math
import numbers
import re
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr

from flaxtumor.app import state as app_state
from flaxtumor.app.uploads import UploadError

TITLE = "Cannot analyse this upload"
UNEXPECTED = "The upload could not be analysed: "


def escape(text: Any) -> str:
    """Plain text for an HTML context (Gradio's error pop-up); quotes stay readable, tags become text."""
    return html.escape(str(text), quote=False)


def md_code(text: Any) -> str:
    """A user string as a Markdown code span: no link, emphasis, autolink or HTML can start inside one. The fence is
    longer than any backtick run in the text, so the text cannot close it."""
    text = str(text).replace("\n", " ").replace("\r", " ")
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    return f"{fence} {text} {fence}"


def _server_paths() -> list[str]:
    # Not the whole temp dir: a member name such as '/tmp/evil.png' is the user's own text and is quoted back.
    roots = {os.environ.get("GRADIO_TEMP_DIR", ""), str(Path(__file__).resolve().parents[1]), sys.prefix}
    if app_state._ROOT is not None:
        roots.add(str(app_state._ROOT))
    return sorted((r for r in roots if len(r) > 1), key=len, reverse=True)


def scrub(text: str) -> str:
    """Removes server paths (a last line of defence: messages are written without them)."""
    for root in _server_paths():
        text = re.sub(re.escape(root) + r"[^\s'\",;)]*", "<server path>", text)
    return text


def public_message(e: BaseException) -> str:
    """The client-facing text of an unexpected error: what happened, in words."""
    if isinstance(e, MemoryError):
        what = "the server ran out of memory for it; try fewer or smaller slices"
    elif isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "the server's disk is full; please try again later"
    elif isinstance(e, OSError):
        what = "a file could not be read or written on the server"
    else:
        what = "an unexpected problem on the server (it has been logged)"
    return UNEXPECTED + what + "."


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Bad uploads become a gr.Error naming the file (escaped); anything unexpected is logged with its traceback and
    reported in words, never fatal."""

    @functools.wraps(fn)
    def wrapper(*args: Any) -> Any:
        try:
            return fn(*args)
        except gr.Error as e:
            raise gr.Error(escape(scrub(e.message)), title=e.title, print_exception=False) from None
        except UploadError as e:
            raise gr.Error(escape(scrub(str(e))), title=TITLE, print_exception=False) from None
        except Exception as e:  # noqa: BLE001 — the server must keep serving other users
            traceback.print_exc()
            raise gr.Error(public_message(e), title=TITLE, print_exception=False) from None

    return wrapper


def number_field(value: Any, field: str, low: float, high: float, unit: str = "", zero_is_unset: bool = False,
                 include_low: bool = False) -> float | None:
    """A finite number in (low, high] (or [low, high] with `include_low`); None when not given. The message names
    the field. Accepts what Gradio and API clients send: int, float or a numeric string; never a bool."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    shown = str(value)[:40]  # escaped with the whole message
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
        raise UploadError(f"{field}: expected a number (got {shown}).")
    try:
        number = float(value)
    except (ValueError, OverflowError):  # a 400-digit integer overflows a float
        raise UploadError(f"{field}: expected a number (got {shown}).") from None
    if zero_is_unset and number == 0:
        return None
    units = f" {unit}" if unit else ""
    if not math.isfinite(number):
        raise UploadError(f"{field}: must be a finite number (got {shown}).")
    if number < low or (number == low and not include_low) or number > high:
        side = "[" if include_low else "("
        raise UploadError(f"{field}: must lie in {side}{low:g}, {high:g}]{units} (got {shown}).")
    return number


def bool_field(value: Any, field: str) -> bool:
    """A checkbox: API clients can send anything, and `bool("false")` is True."""
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    raise UploadError(f"{field}: expected true or false (got {str(value)[:40]}).")

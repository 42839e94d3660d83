"""Process start-up helpers for the command lines and the app: the per-user caches and a clock that starts with the
process.

The caches live in one per-user folder (``$FLAXTUMOR_CACHE_DIR``, else ``$XDG_CACHE_HOME/flaxtumor``, else
``~/.cache/flaxtumor``); ``FLAXTUMOR_CACHE_DIR=off`` disables them. It holds
- ``jax/``: JAX's persistent compilation cache, so a second run skips XLA compilation of every program;
- ``serving/``: per checkpoint, its weights as flat arrays and its compiled forward (`flaxtumor.compiled_model`), so a
  second `predict` or app start also skips rebuilding the model, Orbax and tracing.
Both are harmless when missing, stale or unwritable: entries are keyed by what they depend on, unreadable ones are
ignored and rebuilt, and we simply run without a cache when the folder cannot be written.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)
_enabled: Path | None = None


def cache_dir() -> Path | None:
    """The per-user cache folder, or None when disabled."""
    configured = os.environ.get("FLAXTUMOR_CACHE_DIR")
    if configured is not None:
        return None if configured.strip().lower() in ("", "0", "off", "none") else Path(configured).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "flaxtumor"


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
        return True
    except OSError:
        return False


def enable_compilation_cache() -> Path | None:
    """Turns on the caches (once per process): JAX's persistent compilation cache in FOLDER/jax and the serving cache
    in FOLDER/serving. Returns FOLDER, or None if unavailable."""
    global _enabled
    if _enabled is not None:
        return _enabled
    folder = cache_dir()
    if folder is None or not _writable(folder / "jax"):
        if folder is not None:
            log.info("compilation cache disabled: %s is not writable", folder)
        return None
    import jax

    jax.config.update("jax_compilation_cache_dir", str(folder / "jax"))
    # Cache every program: the small ones (pre/post-processing) add up at start-up too.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    _enabled = folder
    return folder


def serving_cache_dir() -> Path | None:
    """FOLDER/serving once `enable_compilation_cache()` succeeded, else None (library use never writes a cache)."""
    return None if _enabled is None else _enabled / "serving"


def process_seconds() -> float:
    """Seconds since this process started (Linux: from /proc; elsewhere: since this module was imported)."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        start = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]) / ticks
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(uptime - start, 0.0)
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED


_IMPORTED = time.perf_counter()

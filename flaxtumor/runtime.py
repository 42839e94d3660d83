"""Process start-up helpers for the command lines and the app: JAX's persistent compilation cache and a clock that
starts with the process.

The cache keeps compiled XLA programs between runs, so a second `predict` or app start skips compilation. It lives in
a per-user folder (``$FLAXTUMOR_CACHE_DIR``, else ``$XDG_CACHE_HOME/flaxtumor/jax``, else ``~/.cache/flaxtumor/jax``)
and is harmless when missing, stale or unwritable: JAX keys entries by the program, the jaxlib version and the
device, ignores entries it cannot read, and we simply run without a cache when the folder cannot be written.
``FLAXTUMOR_CACHE_DIR=off`` disables it.
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
    """The per-user compilation cache folder, or None when disabled."""
    configured = os.environ.get("FLAXTUMOR_CACHE_DIR")
    if configured is not None:
        return None if configured.strip().lower() in ("", "0", "off", "none") else Path(configured).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "flaxtumor" / "jax"


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
        return True
    except OSError:
        return False


def enable_compilation_cache() -> Path | None:
    """Turns on JAX's persistent compilation cache (once per process); returns its folder, or None if unavailable."""
    global _enabled
    if _enabled is not None:
        return _enabled
    folder = cache_dir()
    if folder is None or not _writable(folder):
        if folder is not None:
            log.info("compilation cache disabled: %s is not writable", folder)
        return None
    import jax

    jax.config.update("jax_compilation_cache_dir", str(folder))
    # Cache every program: the small ones (pre/post-processing) add up at start-up too.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    _enabled = folder
    return folder


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

"""The app's server-side files and state, private and bounded.

- `private_root()`: one temp root per process (`mkdtemp`, mode 0700) with `umask 077`, so nothing the app or Gradio
  writes is readable by other local users; Gradio's temp dir (uploads, output copies) points inside it. It holds the
  synthetic examples (made fresh, so nobody can plant files there), per-request input and output folders, and the
  cached analyses; it is deleted at exit.
- `RequestDirs`: per-request output folders, deleted a grace period after their request finished.
- (`flaxtumor.app.cache.AnalysisStore` keeps each request's analysis on disk under this root, behind a token.)
- `UploadJanitor`: deletes uploads that no request has used within a few minutes, and uploads of refused requests.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any


OUTPUT_GRACE_S = 120.0  # finished requests' output dirs are kept this long (Gradio copies them right after return)
UNUSED_UPLOAD_S = 600.0  # an upload no request has used within this is deleted

_ROOT: Path | None = None
_ROOT_LOCK = threading.Lock()


def private_root() -> Path:
    """The process's private temp root, made on first use. Sets the process umask to 077 (every file written from
    then on is owner-only) and points Gradio's temp dir inside the root; call it before any Gradio Blocks exist."""
    global _ROOT
    with _ROOT_LOCK:
        if _ROOT is None:
            os.umask(0o077)
            _ROOT = Path(tempfile.mkdtemp(prefix="flaxtumor-app-"))  # 0700, a fresh unpredictable name
            (_ROOT / "gradio").mkdir()
            os.environ["GRADIO_TEMP_DIR"] = str(_ROOT / "gradio")
            atexit.register(shutil.rmtree, _ROOT, True)
    return _ROOT


def private_dir(prefix: str) -> Path:
    """A fresh folder under the private root."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=private_root()))


class RequestDirs:
    """Per-request output dirs under one root, deleted `grace_s` after their request finished."""

    def __init__(self, grace_s: float = OUTPUT_GRACE_S, root: Path | None = None):
        self.root = root or private_dir("outputs-")
        self.grace_s = grace_s
        self._finished: dict[Path, float] = {}
        self._lock = threading.Lock()
        atexit.register(self.close)

    def new(self) -> Path:
        self.sweep()
        path = self.root / uuid.uuid4().hex
        path.mkdir()
        return path

    def finish(self, path: Path) -> None:
        with self._lock:
            self._finished[path] = time.monotonic()

    def sweep(self, grace_s: float | None = None) -> None:
        grace = self.grace_s if grace_s is None else grace_s
        now = time.monotonic()
        with self._lock:
            done = [p for p, t in self._finished.items() if now - t >= grace]
            for p in done:
                del self._finished[p]
        for p in done:
            shutil.rmtree(p, ignore_errors=True)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class UploadJanitor:
    """Deletes uploads nobody uses. Gradio records every uploaded path in `blocks.upload_file_set` and keeps the file
    for its cache lifetime (an hour); uploads that no request has used within `unused_s` are deleted, and so are
    the uploads of requests refused for their files. Used uploads stay (a user may re-run with another threshold)
    until Gradio's cache sweep."""

    def __init__(self, unused_s: float = UNUSED_UPLOAD_S):
        self.unused_s = unused_s
        self.blocks: Any = None  # set by build_demo once the Blocks exist
        self._used: dict[str, int] = {}  # upload path -> requests that used it
        self._lock = threading.Lock()

    def use(self, paths: Iterable[Any]) -> None:
        with self._lock:
            for p in {str(p) for p in paths if p}:
                self._used[p] = self._used.get(p, 0) + 1

    def discard(self, paths: Iterable[Any]) -> None:
        """Deletes these refused uploads now: only files Gradio recorded as uploads, and only when no other request
        used them (Gradio stores uploads by content, so two users' identical files share one path)."""
        uploads = self._uploads()
        for p in {str(p) for p in paths if p}:
            with self._lock:
                mine_only = self._used.get(p, 0) <= 1
            if p in uploads and mine_only:
                self._delete(p)

    def sweep(self, unused_s: float | None = None) -> int:
        """Deletes uploads older than `unused_s` that no request used; returns how many."""
        limit = self.unused_s if unused_s is None else unused_s
        now, deleted = time.time(), 0
        for p in list(self._uploads()):
            try:
                age = now - os.stat(p).st_ctime
            except OSError:  # gone already (Gradio's own cache sweep)
                self._forget(p)
                continue
            with self._lock:
                used = p in self._used
            if not used and age >= limit:
                self._delete(p)
                deleted += 1
        return deleted

    def _uploads(self) -> set[str]:
        return getattr(self.blocks, "upload_file_set", set())

    def _delete(self, path: str) -> None:
        try:
            os.unlink(path)
            os.rmdir(os.path.dirname(path))  # Gradio's per-upload hash folder, when now empty
        except OSError:
            pass
        self._forget(path)

    def _forget(self, path: str) -> None:
        self._uploads().discard(path)
        with self._lock:
            self._used.pop(path, None)


class Housekeeping:
    """Runs the sweeps every `period_s` in a daemon thread while the app serves."""

    def __init__(self, *sweeps: Any, period_s: float = 60.0):
        self.sweeps, self.period_s = sweeps, period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flaxtumor-housekeeping", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            for sweep in self.sweeps:
                try:
                    sweep()
                except Exception:  # noqa: BLE001 — housekeeping must never stop the server
                    import traceback

                    traceback.print_exc()

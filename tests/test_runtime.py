"""Start-up helpers: the compilation cache is used when its folder is writable and harmless otherwise; the process
clock; predict --verbose's breakdown line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flaxtumor import runtime

REPO = Path(__file__).resolve().parents[1]


def _run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          cwd=REPO, timeout=300)


COMPILE = ("from flaxtumor.runtime import enable_compilation_cache as e; print(e()); import jax, jax.numpy as jnp; "
           "print(jax.jit(lambda x: jnp.sin(x) * 3)(jnp.ones(7)).sum())")


def test_cache_fills_a_writable_folder(tmp_path) -> None:
    done = _run(COMPILE, {"FLAXTUMOR_CACHE_DIR": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == str(tmp_path / "cache")
    assert any((tmp_path / "cache").iterdir()), "nothing was cached"
    again = _run(COMPILE, {"FLAXTUMOR_CACHE_DIR": str(tmp_path / "cache")})  # a warm cache gives the same result
    assert again.returncode == 0 and again.stdout == done.stdout


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere; the unwritable case is covered by 'off'")
def test_unwritable_cache_is_harmless(tmp_path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    done = _run(COMPILE, {"FLAXTUMOR_CACHE_DIR": str(locked / "cache")})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "None"


def test_cache_in_a_file_path_is_harmless(tmp_path) -> None:
    """A cache path that cannot be a folder (here: below a file) disables the cache instead of failing."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    done = _run(COMPILE, {"FLAXTUMOR_CACHE_DIR": str(blocker / "cache")})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "None"


def test_corrupt_cache_entries_are_harmless(tmp_path) -> None:
    cache = tmp_path / "cache"
    assert _run(COMPILE, {"FLAXTUMOR_CACHE_DIR": str(cache)}).returncode == 0
    for entry in cache.rglob("*"):
        if entry.is_file():
            entry.write_bytes(b"garbage")
    done = _run(COMPILE, {"FLAXTUMOR_CACHE_DIR": str(cache)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1:] == _run(COMPILE, {"FLAXTUMOR_CACHE_DIR": "off"}).stdout.splitlines()[1:]


def test_cache_can_be_turned_off(monkeypatch) -> None:
    monkeypatch.setenv("FLAXTUMOR_CACHE_DIR", "off")
    assert runtime.cache_dir() is None
    monkeypatch.delenv("FLAXTUMOR_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", "/somewhere")
    assert runtime.cache_dir() == Path("/somewhere/flaxtumor")


def test_process_seconds_counts_from_process_start() -> None:
    done = _run("import time; time.sleep(0.5); from flaxtumor.runtime import process_seconds; print(process_seconds())",
                {})
    assert 0.5 <= float(done.stdout) < 30


def test_serving_imports_stay_light() -> None:
    """Loading the inference pipeline must not drag in pandas, grain or the training stack."""
    done = _run("import sys, flaxtumor.inference, flaxtumor.predict; "
                "print(sorted(m for m in ('pandas', 'grain', 'flaxtumor.train.loop') if m in sys.modules))", {})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"

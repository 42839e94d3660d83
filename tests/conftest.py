"""Test set-up: 4 virtual CPU devices (sharding tests) and fast compiles, both before jax is imported; and the strict
mode of CI.

Strict mode (`FLAXTUMOR_STRICT=1`, set by `.ci/run`): a test that would skip because the real LGG data, torch or
chromium is missing fails instead, so CI cannot go green on skips. Without the flag those tests skip with a reason.
"""

import os
import re
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_disable_most_optimizations", True)

REPO = Path(__file__).resolve().parents[1]
LGG_ROOT = Path(os.environ.get("FLAXTUMOR_LGG_ROOT", REPO.parent / "shared" / "lgg" / "kaggle_3m"))
STRICT_ENV = "FLAXTUMOR_STRICT"
# Skip reasons that mean "a dependency CI must have is missing". Matched against the skip message, so the skips
# written in tests/ui and tests/models (importorskip("torch"), skipif(no chromium)) are covered without edits there.
STRICT_SKIP_REASONS = {
    "real data": re.compile(r"real LGG data not found"),
    # importorskip's own message, or a reason that tells to install it; not e.g. "torch.compile does not work here"
    "torch": re.compile(r"could not import 'torch'|No module named 'torch'|pip install torch\b"),
    "chromium": re.compile(r"chromium|chromedriver"),
}


def strict() -> bool:
    return os.environ.get(STRICT_ENV, "").strip().lower() not in ("", "0", "false", "no")


def require(ok: bool, reason: str) -> None:
    """Skip with `reason` when `ok` is false; under strict mode fail with it instead."""
    if ok:
        return
    if strict():
        pytest.fail(f"{STRICT_ENV}=1: {reason}", pytrace=False)
    pytest.skip(reason)


def strict_failure(skip_message: str) -> str | None:
    """The dependency a skip message points at, when strict mode must turn that skip into a failure."""
    if not strict():
        return None
    return next((name for name, pattern in STRICT_SKIP_REASONS.items() if pattern.search(skip_message)), None)


def _skip_message(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    return str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


def _fail_strict_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    message = _skip_message(report)
    missing = strict_failure(message)
    if missing:
        report.outcome = "failed"
        report.longrepr = f"{STRICT_ENV}=1 makes a missing {missing} a failure, not a skip: {message}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_strict_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_strict_skip(outcome.get_result())  # a module-level importorskip skips at collection


@pytest.fixture(scope="session")
def lgg_root() -> Path:
    """The real kaggle_3m folder, or a skip where it is absent (a failure under strict mode)."""
    require(LGG_ROOT.is_dir(), f"real LGG data not found at {LGG_ROOT} (set FLAXTUMOR_LGG_ROOT)")
    return LGG_ROOT


@pytest.fixture(scope="session")
def tiny_cv(tmp_path_factory) -> tuple[Path, Path]:
    """A finished tiny cross-validation (config file, folder), shared by the modules that read it: copy it before
    changing anything in it."""
    from tests.train.helpers import tiny_crossval

    return tiny_crossval(tmp_path_factory.mktemp("cv"))

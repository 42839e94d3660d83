"""Strict CI mode (tests/conftest.py): missing real data, torch or chromium skip locally and fail under
FLAXTUMOR_STRICT=1; other skips stay skips either way."""

import pytest

from tests.conftest import REPO

pytest_plugins = ["pytester"]

CONFTEST = f"""
import sys
sys.path.insert(0, {str(REPO)!r})
from tests.conftest import pytest_make_collect_report, pytest_runtest_makereport, require  # the hooks under test
"""

TESTS = """
import pytest
from conftest import require

def test_real_data():
    require(False, "real LGG data not found at /nowhere (set FLAXTUMOR_LGG_ROOT)")

def test_torch():
    pytest.skip("torch is the reference (pip install torch==2.13.0)")  # tests/models' importorskip reason

@pytest.mark.skipif(True, reason="needs Debian chromium and chromedriver")
def test_browser():
    pass

@pytest.mark.skip(reason="an ordinary skip")
def test_other():
    pass

def test_torch_present_but_a_feature_missing():
    pytest.skip("torch.compile does not work on this machine")

def test_present():
    require(True, "real LGG data not found")
"""

MODULE_SKIP = """
import pytest
# what pytest.importorskip("torch") says where torch is missing
pytest.skip("could not import 'torch': No module named 'torch'", allow_module_level=True)

def test_never_collected():
    pass
"""


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_deps=TESTS, test_module_skip=MODULE_SKIP)
    return pytester


@pytest.mark.slow  # two pytest subprocesses, each importing jax
def test_skips_locally_and_fails_under_the_strict_flag(project: pytest.Pytester, monkeypatch) -> None:
    monkeypatch.delenv("FLAXTUMOR_STRICT", raising=False)
    relaxed = project.runpytest_subprocess("-p", "no:cacheprovider", "-rs")
    relaxed.assert_outcomes(passed=1, skipped=6)
    assert relaxed.ret == 0

    monkeypatch.setenv("FLAXTUMOR_STRICT", "1")
    strict = project.runpytest_subprocess("-p", "no:cacheprovider", "-rfs", "test_deps.py")
    strict.assert_outcomes(passed=1, failed=2, errors=1, skipped=2)  # skipif acts at set-up: an error
    assert strict.ret == 1
    out = strict.stdout.str()
    assert "FLAXTUMOR_STRICT=1: real LGG data not found" in out
    assert "FLAXTUMOR_STRICT=1 makes a missing torch a failure" in out
    assert "FLAXTUMOR_STRICT=1 makes a missing chromium a failure" in out
    assert "SKIPPED [1] test_deps.py:14: an ordinary skip" in out
    # a module-level importorskip happens at collection: it becomes a collection error, which fails the run
    collection = project.runpytest_subprocess("-p", "no:cacheprovider", "test_module_skip.py")
    collection.assert_outcomes(errors=1)
    assert collection.ret != 0 and "makes a missing torch a failure" in collection.stdout.str()

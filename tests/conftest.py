"""Test set-up: 4 virtual CPU devices (sharding tests) and fast compiles, both before jax is imported."""

import os
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_disable_most_optimizations", True)

REPO = Path(__file__).resolve().parents[1]
LGG_ROOT = Path(os.environ.get("FLAXTUMOR_LGG_ROOT", REPO.parent / "shared" / "lgg" / "kaggle_3m"))


@pytest.fixture(scope="session")
def lgg_root() -> Path:
    """The real kaggle_3m folder, or a skip where it is absent."""
    if not LGG_ROOT.is_dir():
        pytest.skip(f"real LGG data not found at {LGG_ROOT} (set FLAXTUMOR_LGG_ROOT)")
    return LGG_ROOT

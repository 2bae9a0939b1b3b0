"""Shared fixtures for the library tests.

Silent broadcasts are errors: ``jax_numpy_rank_promotion`` is set to ``"raise"`` for the whole
session, so an operation that quietly broadcasts arrays of different ranks fails the test that
reaches it instead of computing the wrong thing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, settings

jax.config.update("jax_numpy_rank_promotion", "raise")
# Start JAX's backends now, with the devices the environment asks for: `charrnn train` run
# in-process (click's test runner) would otherwise split the CPU into one device per core for
# the rest of the session when its batch is large enough (see parallel.auto_cpu_devices).
jax.devices()

# Every `charrnn.train` call jits a fresh step function; runs with the same shapes and settings
# lower to the same program, so a session-local persistent cache turns their recompiles (seconds
# each on a small CPU) into cache hits. It changes no result.
_JAX_CACHE = tempfile.mkdtemp(prefix="charrnn-tests-jax-cache-")
jax.config.update("jax_compilation_cache_dir", _JAX_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# The AMX kernel (charrnn.amx) is compiled once per session into a session-local cache, not
# into the user's ~/.cache; subprocesses the tests start inherit it.
_KERNEL_CACHE = tempfile.mkdtemp(prefix="charrnn-tests-kernels-")
os.environ["CHARRNN_KERNEL_CACHE"] = _KERNEL_CACHE

settings.register_profile(
    "charrnn", deadline=None, derandomize=True, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile("charrnn")

REPO_ROOT = Path(__file__).resolve().parents[1]

TINY_TEXT = "the cat sat on the mat.\nthe dog ran to the barn!\n"


def pytest_unconfigure(config):
    shutil.rmtree(_JAX_CACHE, ignore_errors=True)
    shutil.rmtree(_KERNEL_CACHE, ignore_errors=True)


def pytest_report_header(config):
    return f"jax {jax.__version__}; jax_numpy_rank_promotion={jax.config.jax_numpy_rank_promotion}"


@pytest.fixture
def strict_broadcasts():
    """Run the test with implicit rank promotion as an error, whatever the session default."""
    with jax.numpy_rank_promotion("raise"):
        yield


@pytest.fixture
def tiny_text() -> str:
    return TINY_TEXT


@pytest.fixture
def tiny_corpus(tmp_path) -> Path:
    """A small UTF-8 corpus file."""
    path = tmp_path / "tiny.txt"
    path.write_text(TINY_TEXT, encoding="utf-8")
    return path


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A path for a run directory that does not exist yet."""
    return tmp_path / "run"


@pytest.fixture
def shakespeare_path() -> Path:
    """The tinyshakespeare corpus in the shared folder beside the repository, or skip."""
    candidates = [Path("/work/shared/corpora/tinyshakespeare.txt"),
                  REPO_ROOT.parent / "shared" / "corpora" / "tinyshakespeare.txt"]
    for path in candidates:
        if path.is_file():
            return path
    pytest.skip("tinyshakespeare.txt is not in shared/corpora")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)

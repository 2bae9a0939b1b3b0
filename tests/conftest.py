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
# Exact resume holds on a GPU only with XLA:GPU's deterministic operations, which `charrnn
# train` selects before JAX starts; the in-process runs here need them from the start too.
from charrnn.runtime import use_deterministic_gpu_ops  # noqa: E402

use_deterministic_gpu_ops()
# Start JAX's backends now, with the devices the environment asks for: `charrnn train` run
# in-process (click's test runner) would otherwise split the CPU into one device per core for
# the rest of the session when its batch is large enough (see parallel.auto_cpu_devices).
jax.devices()
if jax.default_backend() != "cpu":
    # The reference tests check float32 arithmetic to ~1e-5; JAX's default on a GPU multiplies
    # float32 matrices in TF32 (10-bit mantissas), which they would rightly reject.
    jax.config.update("jax_default_matmul_precision", "highest")

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
    """The tinyshakespeare corpus from the shared folder, or skip.

    The shared folder is ``$CHARRNN_SHARED_DIR`` when set, else ``shared/`` beside the
    repository (``../shared``) or inside it; the corpus is ``corpora/tinyshakespeare.txt`` there.
    """
    roots = [Path(os.environ["CHARRNN_SHARED_DIR"])] if os.environ.get("CHARRNN_SHARED_DIR") else []
    roots += [REPO_ROOT.parent / "shared", REPO_ROOT / "shared"]
    for root in roots:
        path = root / "corpora" / "tinyshakespeare.txt"
        if path.is_file():
            return path
    pytest.skip("tinyshakespeare.txt is not in corpora/ of $CHARRNN_SHARED_DIR or ../shared")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def _train_losses(cell: str, dtype: str, hidden: int, low_token: int = 2, steps: int = 3):
    """``steps`` train steps of a 2-layer ``cell`` model (vocabulary 40, batch 8 x 12) on fixed
    batches of tokens ``low_token..39``: ``(lowered step text, [losses])``. The kernel tests
    run it with a kernel on and off and compare."""
    from charrnn.config import ModelConfig, TrainConfig
    from charrnn.model import build_model
    from charrnn.train_step import init_state, lr_schedule, make_optimizer, make_train_step

    cfg = TrainConfig(batch_size=8, seq_len=12, lr=1e-2, dtype=dtype)
    rng = np.random.default_rng(0)
    batches = [rng.integers(low_token, 40, (8, 13)).astype(np.int32) for _ in range(max(steps, 1))]
    model = build_model(ModelConfig(cell=cell, layers=2, hidden=hidden), 40, 0)
    opt = make_optimizer(cfg, lr_schedule(cfg, None))
    graphdef, state = init_state(model, opt, 0)
    step = make_train_step(graphdef, opt, cfg)
    first = (batches[0][:, :-1], batches[0][:, 1:], np.bool_(False))
    text = step.lower(state, model.initial_carry(8), first).as_text()
    carry, out = model.initial_carry(8), []
    for x in batches[:steps]:
        state, carry, m = step(state, carry, (x[:, :-1], x[:, 1:], np.bool_(False)))
        out.append(float(m["loss"]))
    return text, out


@pytest.fixture
def train_losses():
    """``_train_losses``: train steps' lowered text and losses, for comparing two code paths."""
    return _train_losses

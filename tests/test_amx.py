"""The bfloat16 matmul kernel (``charrnn.amx``: AMX tiles, or AVX512-BF16 where there is no AMX):
exact products, gradients, the model on it, and the fallbacks when it cannot run.

The numeric tests run where the kernel can (a CPU with AMX-BF16 or AVX512-BF16 and a C++
compiler, as this project's machines have) and skip elsewhere; the fallback tests run everywhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from charrnn.backends import bf16_matmul as amx

needs_amx = pytest.mark.skipif(not amx.enabled(), reason="no AMX-BF16 or AVX512-BF16 CPU, or no C++ compiler here")


def test_kernel_is_used_where_it_can_be():
    # Where the CPU has AMX or AVX512-BF16 and a C++ compiler is installed (this project's
    # machines and CI), the kernel must build and load: otherwise every numeric test here would
    # quietly skip.
    if jax.default_backend() != "cpu":
        pytest.skip("JAX runs on a GPU or TPU here: the CPU kernel is rightly off")
    if not amx._cpu_units() or not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("no AMX-BF16 or AVX512-BF16 CPU, or no C++ compiler here")
    assert amx.enabled()


def bf16_operands(m, k, n, seed=0):
    rng = np.random.default_rng(seed)
    a = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    b = jnp.asarray(rng.standard_normal((k, n)), jnp.bfloat16)
    return a, b


def exact(a, b):
    """The product of the bfloat16 values in float64: what a float32 accumulation approximates."""
    return np.asarray(a, np.float64) @ np.asarray(b, np.float64)


@needs_amx
@pytest.mark.parametrize("m,k,n", [(16, 32, 16), (32, 512, 512), (64, 64, 96), (48, 96, 48),
                                   (25, 128, 512), (1, 65, 65), (50, 200, 33), (3, 7, 5),
                                   (37, 96, 400)])
def test_packed_dot_matches_the_exact_product(m, k, n):
    # Shapes off the tile grid (rows not a multiple of 16, K of 32, N of 16) are padded; on
    # AVX512-BF16, rows not a multiple of 8 and column panels not of 3 take the edge blocks.
    a, b = bf16_operands(m, k, n)
    got = np.asarray(jax.jit(amx.packed_dot)(a, amx.pack(b)))
    assert got.shape == (m, n) and got.dtype == np.float32
    ref = exact(a, b)
    # float32 sums of exact bfloat16 products: within a few float32 ulps of the magnitudes summed.
    bound = 1e-6 * (np.abs(np.asarray(a, np.float64)) @ np.abs(np.asarray(b, np.float64))) + 1e-6
    assert np.all(np.abs(got - ref) <= bound)
    assert np.abs(got - ref).max() < 1e-3  # and really the product (not zeros within a loose bound)
    assert np.abs(ref).max() > 1


@needs_amx
def test_pack_layout():
    # Element [n/16][k/2][2*(n%16) + k%2] is b[k, n]: the layout kernels/amx_matmul.cc reads.
    k, n = 64, 48
    b = jnp.arange(k * n, dtype=jnp.float32).reshape(k, n) % 251
    packed = amx.pack(b)
    assert packed.n == n
    p = np.asarray(packed.data, np.float32)
    assert p.shape == (n // 16, k // 2, 32)
    for kk, nn in [(0, 0), (1, 0), (0, 1), (33, 17), (63, 47), (10, 31)]:
        assert p[nn // 16, kk // 2, 2 * (nn % 16) + kk % 2] == float(b[kk, nn])


@needs_amx
def test_dot_takes_leading_axes():
    a, b = bf16_operands(3 * 20, 64, 80, seed=1)
    got = amx.dot(a.reshape(3, 20, 64), b)
    assert got.shape == (3, 20, 80)
    np.testing.assert_allclose(np.asarray(got).reshape(60, 80), exact(a, b), atol=1e-4, rtol=0)


@needs_amx
def test_dot_gradients_are_the_transposed_products():
    a, b = bf16_operands(40, 96, 48, seed=2)
    w = jnp.asarray(np.random.default_rng(3).standard_normal((40, 48)), jnp.float32)

    def loss(dot, a, b):
        return jnp.sum(dot(a, b) * w)

    da, db = jax.jit(jax.grad(lambda a, b: loss(amx.dot, a, b), argnums=(0, 1)))(a, b)
    assert da.dtype == jnp.bfloat16 and db.dtype == jnp.bfloat16
    # The incoming cotangent (here w) is rounded to bfloat16 like the operands (as autocast
    # training does); the products of those are exact in float64 and come back rounded to
    # bfloat16: within half a bfloat16 ulp (at most 2**-8 relative) plus float32 summation error.
    w16 = np.asarray(w.astype(jnp.bfloat16), np.float64)
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    for got, ref, mags in [(da, w16 @ b64.T, np.abs(w16) @ np.abs(b64.T)),
                           (db, a64.T @ w16, np.abs(a64.T) @ np.abs(w16))]:
        err = np.abs(np.asarray(got, np.float64) - ref)
        assert np.all(err <= 2.0 ** -8 * np.abs(ref) + 1e-6 * mags + 1e-30)
        assert np.abs(ref).max() > 1


@needs_amx
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.slow
def test_bfloat16_training_on_the_kernel_matches_xla(cell, monkeypatch, train_losses):
    # The same bfloat16 train steps with the kernel and with XLA's dot: both sum exact bfloat16
    # products in float32, so the losses agree to float32 rounding, not merely to bf16's 1%.
    def losses(kernel: bool):
        monkeypatch.setattr(amx, "enabled", lambda: kernel)
        return train_losses(cell, "bfloat16", hidden=64)

    text_k, with_kernel = losses(True)
    text_x, with_xla = losses(False)
    assert "charrnn_bf16_matmul" in text_k and "charrnn_bf16_matmul" not in text_x
    np.testing.assert_allclose(with_kernel, with_xla, rtol=2e-4)
    assert with_kernel[-1] < with_kernel[0]


def test_float32_never_uses_the_kernel():
    from charrnn.config import ModelConfig, TrainConfig
    from charrnn.model import build_model
    from charrnn.train_step import init_state, lr_schedule, make_optimizer, make_train_step

    cfg = TrainConfig(batch_size=4, seq_len=6)
    model = build_model(ModelConfig(cell="lstm", layers=2, hidden=32), 20, 0)
    opt = make_optimizer(cfg, lr_schedule(cfg, None))
    graphdef, state = init_state(model, opt, 0)
    x = np.zeros((4, 7), np.int32) + 3
    text = make_train_step(graphdef, opt, cfg).lower(
        state, model.initial_carry(4), (x[:, :-1], x[:, 1:], np.bool_(False))).as_text()
    assert "charrnn_bf16_matmul" not in text


_PROBE = "import charrnn.backends.bf16_matmul as a, jax.numpy as jnp; print(a.enabled()); print(float(a.dot(jnp.ones((2, 32), jnp.bfloat16), jnp.ones((32, 16), jnp.bfloat16))[0, 0]))"


def _probe(env_extra, tmp_path):
    env = dict(os.environ, CHARRNN_KERNEL_CACHE=str(tmp_path / "kernels"), **env_extra)
    r = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout.split(), r.stderr


@pytest.mark.slow
def test_charrnn_amx_0_turns_the_kernel_off(tmp_path):
    (on, value), _ = _probe({"CHARRNN_AMX": "0"}, tmp_path)
    assert on == "False" and value == "32.0"  # XLA's dot, same product
    assert not (tmp_path / "kernels").exists()  # nothing built


@needs_amx
@pytest.mark.slow
def test_a_failed_build_falls_back_to_xla(tmp_path):
    (on, value), err = _probe({"CXX": "false"}, tmp_path)
    assert on == "False" and value == "32.0"
    assert "build failed" in err
    assert not list((tmp_path / "kernels").glob("*.so"))  # no half-built library left behind


@needs_amx
@pytest.mark.slow
def test_the_kernel_is_built_once_and_reused(tmp_path):
    (on, value), _ = _probe({}, tmp_path)
    assert on == "True" and value == "32.0"
    built = list((tmp_path / "kernels").glob("*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    (on, _), _ = _probe({}, tmp_path)
    assert on == "True"
    assert [p.stat().st_mtime_ns for p in (tmp_path / "kernels").glob("*.so")] == [stamp]


@needs_amx
def test_pack_transposed_is_pack_of_the_transpose():
    b = jnp.asarray(np.random.default_rng(4).standard_normal((40, 70)), jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(amx.pack(b, transpose=True).data, np.float32),
                                  np.asarray(amx.pack(b.T).data, np.float32))
    a = jnp.asarray(np.random.default_rng(5).standard_normal((9, 70)), jnp.bfloat16)
    np.testing.assert_allclose(np.asarray(amx.packed_dot(a, amx.pack(b, transpose=True))),
                               exact(a, b.T), atol=1e-4, rtol=0)

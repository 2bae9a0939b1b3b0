"""The native float32 LSTM layer (``charrnn.backends.lstm_window``): values and gradients against XLA's
scan and an independent float64 reference, the model on it, and its fallbacks.

The numeric tests run where the kernel can (an AVX-512 CPU and a C++ compiler, as this
project's machines have) and skip elsewhere; the fallback tests run everywhere.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from charrnn.backends import lstm_window as lstm_kernel
from charrnn.backends import native, xla

needs_kernel = pytest.mark.skipif(not lstm_kernel.enabled(), reason="no AVX-512 CPU or no C++ compiler here")
needs_bf16_kernel = pytest.mark.skipif(not lstm_kernel.bf16_enabled(),
                                       reason="no AVX512-BF16 CPU (or one with AMX), or no C++ compiler here")
DTYPES = [jnp.float32, pytest.param(jnp.bfloat16, marks=needs_bf16_kernel)]


def test_kernel_is_used_where_it_can_be():
    # Where the CPU has AVX-512 and a C++ compiler is installed (this project's machines and
    # CI), the kernel must build and load: otherwise every numeric test here would quietly skip.
    if jax.default_backend() != "cpu":
        pytest.skip("JAX runs on a GPU or TPU here: the CPU kernel is rightly off")
    if "avx512f" not in native.cpu_flags() or not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("no AVX-512 CPU or no C++ compiler here")
    assert lstm_kernel.enabled()
    if "avx512_bf16" in native.cpu_flags() and "amx_tile" not in native.cpu_flags():
        assert lstm_kernel.bf16_enabled()  # and so the bfloat16 tests below run too


def inputs(T, B, H, seed=0, reset=0.15):
    """``(w_hh, bias, carry0, xw_TxBxG, keep)`` for ``lstm_kernel.layer``."""
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.uniform(-1, 1, (H, 4 * H)) * H ** -0.5, jnp.float32)
    bias = jnp.asarray(rng.uniform(-0.5, 0.5, 4 * H), jnp.float32)
    xw = jnp.asarray(rng.standard_normal((T, B, 4 * H)), jnp.float32)
    keep = (rng.random((T, B, 1)) > reset).astype(np.float32)
    keep[0, B - 1] = 0.0  # a reset on the very first step, too (the last row's)
    carry0 = tuple(jnp.asarray(rng.standard_normal((B, H)), jnp.float32) for _ in range(2))
    return w, bias, carry0, xw, jnp.asarray(keep)


def reference(w, bias, carry0, xw, keep):
    """The LSTM in float64 numpy, step by step: (h_all, c_all)."""
    w, bias, xw = (np.asarray(x, np.float64) for x in (w, bias, xw))
    keep = np.asarray(keep, np.float64)
    c, h = (np.asarray(x, np.float64) for x in carry0)
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    hs, cs = [], []
    for t in range(keep.shape[0]):
        c, h = c * keep[t], h * keep[t]
        i, f, g, o = np.split(xw[t] + bias + h @ w, 4, axis=-1)
        i, f, g, o = sig(i), sig(f), np.tanh(g), sig(o)
        c = f * c + i * g
        h = o * np.tanh(c)
        hs.append(h)
        cs.append(c)
    return np.stack(hs), np.stack(cs)


def xla_layer(w, bias, carry0, xw, keep, dtype=jnp.float32):
    """The same layer on XLA's scan (the model's path without the kernel)."""
    return xla._scan_layer("lstm", dtype, xla.gate_blocks(w, 4), carry0,
                           xla.gate_blocks(xw + bias[None, None], 4), keep)


SHAPES = [(7, 1, 16), (12, 5, 40), (9, 13, 100), (5, 32, 64), (3, 25, 33)]


def window_loss(keep, proj):
    """``loss(layer, w, bias, carry0, xw)``: a scalar that reads every output of the layer over the
    window (h at every step through ``proj``, and the final carry), for comparing gradients."""
    def loss(layer, w, bias, carry0, xw):
        (c, h), h_all = layer(w, bias, carry0, xw, keep)
        return jnp.sum(jnp.sin(h_all) * proj) + jnp.sum(0.3 * c) + jnp.sum(0.7 * h)
    return loss


def assert_gradients_close(got, want, rel):
    """Each gradient of ``got`` within ``rel`` of the largest magnitude of ``want``'s."""
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.shape == r.shape and g.dtype == jnp.float32
        scale = float(jnp.max(jnp.abs(r)))
        if scale == 0.0:  # the initial carry of a row reset on the first step
            assert float(jnp.max(jnp.abs(g))) == 0.0
            continue
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=rel * scale, rtol=0)


@needs_kernel
@pytest.mark.parametrize("T,B,H", SHAPES)
def test_forward_matches_a_float64_reference(T, B, H):
    w, bias, carry0, xw, keep = inputs(T, B, H)
    (c_T, h_T), h_all = jax.jit(lstm_kernel.layer)(w, bias, carry0, xw, keep)
    ref_h, ref_c = reference(w, bias, carry0, xw, keep)
    assert h_all.shape == (T, B, H) and h_all.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(h_all), ref_h, atol=2e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(c_T), ref_c[-1], atol=2e-6 * max(1, np.abs(ref_c).max()), rtol=0)
    np.testing.assert_array_equal(np.asarray(h_T), np.asarray(h_all[-1]))
    assert np.abs(ref_h).max() > 0.5  # and really an LSTM's output, not zeros within a bound


@needs_kernel
@pytest.mark.parametrize("T,B,H", SHAPES)
def test_gradients_match_xla_scan(T, B, H):
    w, bias, carry0, xw, keep = inputs(T, B, H, seed=1)
    loss = window_loss(keep, jnp.asarray(np.random.default_rng(2).standard_normal((T, B, H)), jnp.float32))
    args = (w, bias, carry0, xw)
    got = jax.jit(jax.value_and_grad(lambda *a: loss(lstm_kernel.layer, *a), argnums=(0, 1, 2, 3)))(*args)
    want = jax.jit(jax.value_and_grad(lambda *a: loss(xla_layer, *a), argnums=(0, 1, 2, 3)))(*args)
    # a sum of T*B*H terms of order 1, each within a few float32 ulps
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=0, atol=1e-7 * T * B * H)
    assert float(jnp.max(jnp.abs(got[1][0]))) > 0.01 and float(jnp.max(jnp.abs(got[1][1]))) > 0.01
    assert_gradients_close(got[1], want[1], 1e-5)


@needs_kernel
def test_a_reset_cuts_the_gradient_to_the_state_before_it():
    # keep = 0 at step 3 for every row: nothing before it, the initial carry included, may
    # receive gradient from the outputs after it.
    w, bias, carry0, xw, keep = inputs(6, 4, 32, seed=3, reset=0.0)
    keep = keep.at[:].set(1.0).at[3].set(0.0)

    def late(carry0, xw):
        return jnp.sum(lstm_kernel.layer(w, bias, carry0, xw, keep)[1][3:])

    d_carry0, d_xw = jax.grad(late, argnums=(0, 1))(carry0, xw)
    assert all(float(jnp.abs(d).max()) == 0.0 for d in d_carry0)
    assert float(jnp.abs(d_xw[:3]).max()) == 0.0 and float(jnp.abs(d_xw[3:]).max()) > 0


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_do_not_depend_on_how_many_there_are(dtype):
    # Data parallelism gives each device some of the rows: a row's result must not depend on
    # how many rows share the call (the matmul's row blocks differ), bit for bit.
    w, bias, carry0, xw, keep = inputs(8, 29, 48, seed=4)
    layer = jax.jit(functools.partial(lstm_kernel.layer, dtype=dtype))
    whole = layer(w, bias, carry0, xw, keep)[1]
    for rows in (slice(5, 12), slice(0, 1), slice(3, 28)):
        part = layer(w, bias, tuple(c[rows] for c in carry0), xw[:, rows], keep[:, rows])[1]
        np.testing.assert_array_equal(np.asarray(part), np.asarray(whole[:, rows]))


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", [2, 3, 7])
def test_rows_split_over_threads_give_the_same_values_and_gradients(threads, dtype):
    # One device alone on several cores splits a window's rows over threads (13 rows: parts of
    # 4-5 rows; 7 threads ask for more parts than 4-row parts allow). Every output, the
    # gradients (dz's row sums for the bias among them) included, must equal one thread's bit
    # for bit.
    w, bias, carry0, xw, keep = inputs(9, 13, 40, seed=5)
    loss = window_loss(keep, jnp.asarray(np.random.default_rng(6).standard_normal((9, 13, 40)), jnp.float32))

    def run(n):
        layer = functools.partial(lstm_kernel.layer, threads=n, dtype=dtype)
        return jax.jit(jax.value_and_grad(functools.partial(loss, layer), argnums=(0, 1, 2, 3)))(w, bias, carry0, xw)

    one, many = run(1), run(threads)
    assert float(jnp.abs(one[1][1]).max()) > 0.01  # the bias gradient is really summed
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(many)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@needs_bf16_kernel
@pytest.mark.parametrize("T,B,H", SHAPES + [(20, 32, 512)])
def test_bfloat16_values_and_gradients_match_xla_bfloat16_scan(T, B, H):
    # Both round h (forward) and the gates' cotangent (backward) to bfloat16 before each
    # recurrent product and sum exact bfloat16 products in float32: they agree to float32
    # rounding (which, now and then, rounds a value to the neighbouring bfloat16 and so grows
    # over a long window: 3e-5 in h after 20 steps of H = 512), far closer than either is to
    # the float32 layer (bfloat16's rounding: 1e-4 to 2e-3 in h here).
    w, bias, carry0, xw, keep = inputs(T, B, H, seed=1)
    loss = window_loss(keep, jnp.asarray(np.random.default_rng(2).standard_normal((T, B, H)), jnp.float32))
    layers = {"kernel": functools.partial(lstm_kernel.layer, dtype=jnp.bfloat16),
              "xla": functools.partial(xla_layer, dtype=jnp.bfloat16), "f32": lstm_kernel.layer}
    h = {k: np.asarray(jax.jit(f)(w, bias, carry0, xw, keep)[1]) for k, f in layers.items()}
    grads = {k: jax.jit(jax.value_and_grad(functools.partial(loss, f), argnums=(0, 1, 2, 3)))(w, bias, carry0, xw)
             for k, f in layers.items()}
    near, far = np.abs(h["kernel"] - h["xla"]).max(), np.abs(h["kernel"] - h["f32"]).max()
    assert near <= 1e-4 and far > 30 * near
    np.testing.assert_allclose(float(grads["kernel"][0]), float(grads["xla"][0]), rtol=1e-5, atol=1e-4)
    assert_gradients_close(grads["kernel"][1], grads["xla"][1], 2e-3)


def test_one_device_alone_uses_every_core_and_devices_share_them(monkeypatch):
    monkeypatch.setattr(lstm_kernel.parallel, "usable_cores", lambda: 4)
    monkeypatch.setattr(lstm_kernel.jax, "local_device_count", lambda: 1)
    assert lstm_kernel.default_threads() == 4
    monkeypatch.setattr(lstm_kernel.jax, "local_device_count", lambda: 2)
    assert lstm_kernel.default_threads() == 2
    monkeypatch.setattr(lstm_kernel.jax, "local_device_count", lambda: 8)
    assert lstm_kernel.default_threads() == 1


@needs_kernel
@pytest.mark.parametrize("dtype,switch,target", [
    ("float32", "enabled", "charrnn_lstm_forward"),
    pytest.param("bfloat16", "bf16_enabled", "charrnn_lstm_forward_bf16", marks=needs_bf16_kernel)])
@pytest.mark.slow
def test_lstm_training_on_the_kernel_matches_xla(monkeypatch, train_losses, dtype, switch, target):
    # low_token 1: batches that read START tokens, so the state is reset inside the window.
    monkeypatch.setattr(lstm_kernel, switch, lambda: True)
    text_k, with_kernel = train_losses("lstm", dtype, hidden=48, low_token=1)
    monkeypatch.setattr(lstm_kernel, switch, lambda: False)
    text_x, with_xla = train_losses("lstm", dtype, hidden=48, low_token=1)
    assert target in text_k and target.replace("forward", "backward") in text_k
    assert "charrnn_lstm" not in text_x
    np.testing.assert_allclose(with_kernel, with_xla, rtol=1e-5)
    assert with_kernel[-1] < with_kernel[0]


@pytest.mark.parametrize("cell,dtype", [("gru", "float32"), ("rnn", "float32"), ("gru", "bfloat16"),
                                        ("lstm", "bfloat16")])
def test_only_lstm_layers_use_it_and_bfloat16_ones_only_where_bf16_enabled(monkeypatch, train_losses, cell, dtype):
    monkeypatch.setattr(lstm_kernel, "enabled", lambda: True)
    monkeypatch.setattr(lstm_kernel, "bf16_enabled", lambda: False)
    text, _ = train_losses(cell, dtype, hidden=48, low_token=1, steps=0)  # the program is enough
    assert "charrnn_lstm" not in text


_PROBE = ("import charrnn.backends.lstm_window as k, jax.numpy as jnp; print(k.enabled()); "
          "from charrnn.model import Cell; from charrnn import backends, cells; from flax import nnx; "
          "c = Cell('lstm', 3, 16, rngs=nnx.Rngs(0)); "
          "out = backends.layer('lstm', c.params(), cells.initial_carry('lstm', 2, 16), "
          "jnp.zeros((4, 2), jnp.int32), jnp.ones((4, 2, 1)), True); "
          "print(f'{float(out[1].sum()):.5f}')")


def _probe(env_extra, tmp_path, fresh_cache=True):
    """Run _PROBE in a new process; with ``fresh_cache`` its kernels go to an empty directory."""
    env = dict(os.environ, **env_extra)
    if fresh_cache:
        env["CHARRNN_KERNEL_CACHE"] = str(tmp_path / "kernels")
    r = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout.split(), r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("switch", ["CHARRNN_LSTM_KERNEL", "CHARRNN_KERNELS"])
def test_charrnn_lstm_kernel_0_turns_it_off(tmp_path, switch):
    (on, value), _ = _probe({switch: "0"}, tmp_path)
    assert on == "False"
    assert not list((tmp_path / "kernels").glob("rnn_cpu-*.so"))  # nothing built
    if lstm_kernel.enabled():  # the same layer on the kernel, to float32 rounding
        (on_k, value_k), _ = _probe({}, tmp_path, fresh_cache=False)  # the session's build
        assert on_k == "True" and abs(float(value_k) - float(value)) < 1e-4


@needs_kernel
@pytest.mark.slow
def test_a_failed_build_falls_back_to_xla(tmp_path):
    (on, value), err = _probe({"CXX": "false", "CHARRNN_AMX": "0"}, tmp_path)
    assert on == "False" and float(value) != 0.0
    assert "build failed" in err
    assert not list((tmp_path / "kernels").glob("*.so"))  # no half-built library left behind


def test_a_kernel_is_rebuilt_when_a_header_it_includes_changes(tmp_path, monkeypatch):
    # rnn_cpu.cc and amx_matmul.cc both include kernels/bf16_dot.h: a library built from an
    # older header must not be loaded as current.
    if not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("no C++ compiler here")
    kernels = tmp_path / "src"
    kernels.mkdir()
    (kernels / "k.h").write_text("inline int Value() { return 1; }\n")
    (kernels / "k.cc").write_text('#include "k.h"\nextern "C" int value() { return Value(); }\n')
    monkeypatch.setattr(native, "KERNELS", kernels)
    monkeypatch.setenv("CHARRNN_KERNEL_CACHE", str(tmp_path / "cache"))
    first = native.build("k", [], "nothing")
    assert first is not None and native.build("k", [], "nothing") == first  # built once
    (kernels / "k.h").write_text("inline int Value() { return 2; }\n")
    second = native.build("k", [], "nothing")
    assert second is not None and second != first
    import ctypes
    assert ctypes.CDLL(str(second)).value() == 2

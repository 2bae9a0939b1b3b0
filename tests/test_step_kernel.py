"""The native float32 sampling step (``charrnn.backends.step_kernel``): one step of every cell kind against a
float64 reference and against XLA's step, threads and rows that change nothing, the sampler on it,
and its switch.

The numeric tests run where the kernel can (an AVX-512 CPU and a C++ compiler, as this project's
machines have) and skip elsewhere.
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
from flax import nnx

from charrnn import parallel
from charrnn.backends import native, step_kernel, xla
from charrnn import sample as sampler
from charrnn.config import ModelConfig
from charrnn.model import build_model, split_model
from charrnn.vocab import START

needs_kernel = pytest.mark.skipif(not step_kernel.enabled(), reason="no AVX-512 CPU or no C++ compiler here")
V = 29


def test_kernel_is_used_where_it_can_be():
    # Where the kernel can run it must: otherwise every numeric test here would quietly skip.
    if jax.default_backend() != "cpu":
        pytest.skip("JAX runs on a GPU or TPU here: the CPU kernel is rightly off")
    if "avx512f" not in native.cpu_flags() or not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("no AVX-512 CPU or no C++ compiler here")
    assert step_kernel.enabled()


def _sig(z):
    return 1 / (1 + np.exp(-z))


def reference_steps(cell, params, carry, tokens_BxT):
    """Float64 numpy: the model's steps (no resets) from the textbook equations; final
    ``(carry, logits_BxV)``."""
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    layers = [{k: f64(v) for k, v in p.items()} for p in params["cells"].values()]
    state = [[f64(a) for a in c] for c in carry]
    for t in range(tokens_BxT.shape[1]):
        x = f64(params["cells"][0]["w_ih"])[tokens_BxT[:, t]]  # the one-hot layer: rows of w_ih
        for i, (p, s) in enumerate(zip(layers, state)):
            a = (x if i == 0 else x @ p["w_ih"]) + p["b_ih"]
            h = s[-1]
            hw = h @ p["w_hh"]
            n = h.shape[1]
            if cell == "rnn":
                s[0] = np.tanh(a + hw)
            elif cell == "lstm":
                z = a + hw
                gi, gf, gg, go = (z[:, k * n:(k + 1) * n] for k in range(4))
                s[0] = _sig(gf) * s[0] + _sig(gi) * np.tanh(gg)
                s[1] = _sig(go) * np.tanh(s[0])
            else:
                hw = hw + p["b_hh"]
                r = _sig(a[:, :n] + hw[:, :n])
                z = _sig(a[:, n:2 * n] + hw[:, n:2 * n])
                nn = np.tanh(a[:, 2 * n:] + r * hw[:, 2 * n:])
                s[0] = (1 - z) * nn + z * h
            x = s[-1]
    return state, x @ f64(params["w_out"]) + f64(params["b_out"])


def _model(cell, hidden, layers=2, seed=0):
    model = build_model(ModelConfig(cell=cell, layers=layers, hidden=hidden), V, seed)
    return split_model(model)


def _random_carry(graphdef, params, batch, seed=1):
    rng = np.random.default_rng(seed)
    zero = nnx.merge(graphdef, params).initial_carry(batch)
    return jax.tree_util.tree_map(lambda a: jnp.asarray(rng.uniform(-0.8, 0.8, a.shape), jnp.float32), zero)


def run_steps(graphdef, params, carry, tokens_BxT, threads=1, kernel=True):
    """The model's steps over the tokens (weights prepared once) on the kernel or on XLA's
    operations: ``(carry, logits)``."""

    @jax.jit
    def go(params, carry, tokens):
        model = nnx.merge(graphdef, params)
        kind, layers = model.config.cell, [c.params() for c in model.cells]
        if kernel:
            weights = step_kernel.prepare(kind, layers, params["w_out"], params["b_out"], threads)
            step = step_kernel.step
        else:
            weights = xla.prepare_step(kind, layers, params["w_out"], params["b_out"])
            step = functools.partial(xla.step, kind)
        logits = None
        for t in range(tokens.shape[1]):
            carry, logits = step(weights, carry, tokens[:, t])
        return carry, logits

    return go(params, carry, jnp.asarray(tokens_BxT))


CASES = [("rnn", 40, 1), ("lstm", 16, 3), ("lstm", 100, 5), ("gru", 64, 13), ("gru", 33, 2), ("rnn", 96, 32)]


@needs_kernel
@pytest.mark.parametrize("cell,hidden,batch", CASES)
def test_steps_match_a_float64_reference_and_xla(cell, hidden, batch):
    graphdef, params = _model(cell, hidden)
    carry = _random_carry(graphdef, params, batch)
    tokens = np.random.default_rng(3).integers(2, V, (batch, 6)).astype(np.int32)
    (new_carry, logits) = run_steps(graphdef, params, carry, tokens)
    ref_carry, ref_logits = reference_steps(cell, params, carry, tokens)
    assert logits.shape == (batch, V) and logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits, np.float64), ref_logits, atol=2e-5, rtol=0)
    for got, want in zip(jax.tree_util.tree_leaves(new_carry), [a for c in ref_carry for a in c]):
        np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=2e-6, rtol=0)
    xla_carry, xla_logits = run_steps(graphdef, params, carry, tokens, kernel=False)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(xla_logits), atol=2e-5, rtol=0)
    # and the kernel was what ran: its HLO calls it, XLA's does not
    lowered = {k: jax.jit(lambda p: run_steps(graphdef, p, carry, tokens, kernel=k)).lower(params).as_text()
               for k in (True, False)}
    assert "charrnn_cell_step" in lowered[True] and "charrnn_dense" in lowered[True]
    assert "charrnn_" not in lowered[False]


@needs_kernel
def test_the_model_step_takes_the_kernel_for_every_row_count():
    # Sampling's steps always run on the kernel where it is enabled, whatever the batch: a row's
    # sums then run in one order, so it draws the same text alone or among others.
    graphdef, params = _model("lstm", 32)

    def lowered(rows, threads=1):
        tok = jnp.zeros((rows,), jnp.int32)
        model = nnx.merge(graphdef, params)
        w = model.step_weights(jnp.float32, threads)
        return jax.jit(lambda c: model.step_with(w, c, tok)).lower(model.initial_carry(rows)).as_text()

    for rows, threads in ((1, 1), (2, 1), (3, 1), (32, 1), (32, 2)):
        assert "charrnn_cell_step" in lowered(rows, threads), rows


@needs_kernel
@pytest.mark.parametrize("threads", [2, 3, 7])
def test_threads_change_nothing(threads):
    # The step splits its hidden units over threads in whole 32-column panels (H=100: 4 panels,
    # unevenly over 3 threads; more threads than panels); every value is computed the same way
    # on any thread, so the results are bit-identical to one thread.
    for cell in ("lstm", "gru"):
        graphdef, params = _model(cell, 100)
        carry = _random_carry(graphdef, params, 2)
        tokens = np.random.default_rng(4).integers(2, V, (2, 4)).astype(np.int32)
        one = run_steps(graphdef, params, carry, tokens, threads=1)
        many = run_steps(graphdef, params, carry, tokens, threads=threads)
        for a, b in zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(many)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@needs_kernel
def test_rows_do_not_depend_on_how_many_there_are():
    # A row's step is the same whether it runs alone (1-4 rows use a wider matmul pass) or among
    # 13: so sampling's rows split over devices draw exactly what one device draws.
    graphdef, params = _model("gru", 48)
    carry = _random_carry(graphdef, params, 13)
    tokens = np.random.default_rng(5).integers(2, V, (13, 3)).astype(np.int32)
    all_rows = run_steps(graphdef, params, carry, tokens)
    for rows in (slice(0, 1), slice(4, 6), slice(9, 13)):
        part = run_steps(graphdef, params, jax.tree_util.tree_map(lambda a: a[rows], carry), tokens[rows])
        for a, b in zip(jax.tree_util.tree_leaves(all_rows), jax.tree_util.tree_leaves(part)):
            np.testing.assert_array_equal(np.asarray(a)[rows], np.asarray(b))


_TWO_DEVICES = """
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P
from charrnn import parallel
from charrnn.config import ModelConfig
from charrnn.model import build_model, split_model
assert jax.local_device_count() == 2
graphdef, params = split_model(build_model(ModelConfig(cell="lstm", layers=2, hidden=64), 29, 0))
carry = jax.tree_util.tree_map(lambda a: a + 0.3, nnx.merge(graphdef, params).initial_carry(8))
tokens = jnp.asarray(np.random.default_rng(6).integers(2, 29, (8, 5)).astype(np.int32))
def steps(carry, tokens, threads):
    model = nnx.merge(graphdef, params)
    weights = model.step_weights(jnp.float32, threads)
    for t in range(tokens.shape[1]):
        carry, logits = model.step_with(weights, carry, tokens[:, t])
    return carry, logits
want = jax.jit(lambda c, t: steps(c, t, 1))(carry, tokens)
split = jax.jit(jax.shard_map(lambda c, t: steps(c, t, 2), mesh=parallel.local_mesh(2),
                              in_specs=(P(parallel.AXIS), P(parallel.AXIS)),
                              out_specs=(P(parallel.AXIS), P(parallel.AXIS))))
for _ in range(20):
    got = split(carry, tokens)
    for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
print("same")
"""


@needs_kernel
@pytest.mark.slow
def test_two_devices_sharing_the_helper_threads_get_the_one_thread_result():
    # Two devices' loops can step at once; only one holds the helper threads at a time and the
    # other computes every part itself. Either way, the values of one thread.
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", _TWO_DEVICES], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["same"]


@needs_kernel
def test_the_sampler_draws_the_same_text_on_the_kernel_and_on_xla(monkeypatch):
    # The kernel agrees with XLA's step to float32 rounding, far below what moves a draw here:
    # the same key gives the same characters (this model and seed, checked once, fixed).
    graphdef, params = _model("gru", 72)
    prompt = sampler.prompt_tokens(np.array([3, 4, 5], np.int32), 2)

    def draw():
        prime, generate = sampler.make_sampler(sampler.model_step_fn(graphdef), chunk=32)
        carry = (params, nnx.merge(graphdef, params).initial_carry(2))
        toks = next(sampler.generate_stream(prime, generate, carry, prompt, jax.random.PRNGKey(7),
                                            sampler.make_controls(V, 0.9), 32))
        hlo = generate.lower(prime(carry, jnp.asarray(prompt), jax.random.PRNGKey(7)),
                             sampler.make_controls(V, 0.9)).as_text()
        return toks, "charrnn_cell_step" in hlo

    on_kernel, used = draw()
    monkeypatch.setattr(step_kernel, "enabled", lambda: False)
    on_xla, used_xla = draw()
    assert used and not used_xla
    assert on_kernel.shape == (2, 32) and START not in on_kernel
    np.testing.assert_array_equal(on_kernel, on_xla)


def test_sampling_threads_only_where_the_weights_leave_l2():
    mb = 1 << 20
    assert parallel.sampling_threads(int(2.4 * mb), cores=2, l2_bytes=2 * mb) == 2
    assert parallel.sampling_threads(int(1.2 * mb), cores=2, l2_bytes=2 * mb) == 1
    assert parallel.sampling_threads(int(12 * mb), cores=4, l2_bytes=2 * mb) == 4


@pytest.mark.slow
def test_charrnn_step_kernel_0_turns_it_off(tmp_path):
    probe = ("import jax.numpy as jnp; from charrnn.backends import step_kernel; "
             "from charrnn.config import ModelConfig; from charrnn.model import build_model; "
             "m = build_model(ModelConfig(cell='gru', layers=2, hidden=8), 7, 0); "
             "c, logits = m.step(m.initial_carry(2), jnp.array([2, 3])); "
             "print(step_kernel.enabled(), f'{float(logits.sum()):.5f}')")
    env = dict(os.environ, CHARRNN_STEP_KERNEL="0", CHARRNN_LSTM_KERNEL="0",
               CHARRNN_KERNEL_CACHE=str(tmp_path / "kernels"))
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    on, value = r.stdout.split()
    assert on == "False"
    assert not list((tmp_path / "kernels").glob("*.so"))  # nothing built
    if step_kernel.enabled():  # the same step on the kernel, to float32 rounding
        m = build_model(ModelConfig(cell="gru", layers=2, hidden=8), 7, 0)
        _, logits = m.step(m.initial_carry(2), jnp.array([2, 3]))
        assert abs(float(logits.sum()) - float(value)) < 1e-4

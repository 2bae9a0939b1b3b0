"""Every backend against the definition (``charrnn.cells``): values and gradients, one set of cases.

The reference's gradients come from autodiff of the lecture-notes equations; each backend has its
own (a hand-written backward, a native kernel). A case runs a layer over a window with resets
(the state zeroed where a start token is read), from a non-zero carry, with one-hot or dense input.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_matches_reference, assert_steps_match

from charrnn import backends, cells
from charrnn.backends import lstm_window, step_kernel, xla
from charrnn.backends.bf16_matmul import matmul
from charrnn.config import GATES

T, B, H, V, I = 7, 5, 24, 11, 19


def _window_backend(name):
    if name == "xla":
        return xla.layer

    def window(kind, p, carry, x, keep, one_hot, dtype):
        xw = jnp.take(p["w_ih"], x, axis=0) if one_hot else matmul(x, p["w_ih"], dtype)
        return lstm_window.layer(p["w_hh"], p["b_ih"], tuple(carry), xw, keep, dtype=dtype)

    return window


def _window_cases():
    cases = [(name, kind, "float32") for kind in GATES for name in ("xla",)]
    cases += [("xla", kind, "bfloat16") for kind in GATES]
    if lstm_window.enabled():
        cases.append(("lstm_window", "lstm", "float32"))
    if lstm_window.bf16_enabled():
        cases.append(("lstm_window", "lstm", "bfloat16"))
    return cases


def _params(kind, in_features, seed=0):
    rng = np.random.default_rng(seed)
    g = GATES[kind] * H
    p = {"w_ih": rng.uniform(-0.4, 0.4, (in_features, g)), "w_hh": rng.uniform(-0.4, 0.4, (H, g)),
         "b_ih": rng.uniform(-0.3, 0.3, (g,))}
    if kind == "gru":
        p["b_hh"] = rng.uniform(-0.3, 0.3, (g,))
    return {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}


def _inputs(kind, one_hot, seed=1):
    rng = np.random.default_rng(seed)
    carry = tuple(jnp.asarray(rng.uniform(-0.7, 0.7, (B, H)), jnp.float32) for _ in range(cells.state_size(kind)))
    if one_hot:
        x = rng.integers(0, V, (T, B)).astype(np.int32)
        keep = (x != 0)[..., None].astype(np.float32)  # token 0 plays the start token
        x = jnp.asarray(x)
    else:
        x = jnp.asarray(rng.uniform(-1, 1, (T, B, I)), jnp.float32)
        keep = (rng.uniform(size=(T, B, 1)) > 0.2).astype(np.float32)
    return carry, x, jnp.asarray(keep)


def _loss(layer, kind, dtype, one_hot):
    """A scalar that weighs every output and the final carry differently, so its gradient
    reaches every path of the layer."""
    w_h = jnp.asarray(np.random.default_rng(7).normal(size=(T, B, H)), jnp.float32)

    def loss(p, carry, x, keep):
        final, h = layer(kind, p, carry, x, keep, one_hot, dtype) if dtype is not None else \
            cells.layer(kind, p, carry, x, keep, one_hot)
        return jnp.sum(h * w_h) + sum(jnp.sum(c * (j + 1.5)) for j, c in enumerate(final))

    return loss


@pytest.mark.parametrize("one_hot", [True, False], ids=["one-hot", "dense"])
@pytest.mark.parametrize("name, kind, dtype", _window_cases(), ids=lambda v: str(v))
def test_a_window_equals_the_reference_in_values_and_gradients(name, kind, dtype, one_hot):
    p = _params(kind, V if one_hot else I)
    carry, x, keep = _inputs(kind, one_hot)
    dt = jnp.dtype(dtype)
    layer = _window_backend(name)
    argnums = (0, 1) if one_hot else (0, 1, 2)
    want_final, want_h = jax.jit(functools.partial(cells.layer, kind, one_hot=one_hot))(p, carry, x, keep)
    got_final, got_h = jax.jit(lambda *a: layer(kind, *a, one_hot, dt))(p, carry, x, keep)
    want_g = jax.jit(jax.grad(_loss(None, kind, None, one_hot), argnums=argnums))(p, carry, x, keep)
    got_g = jax.jit(jax.grad(_loss(layer, kind, dt, one_hot), argnums=argnums))(p, carry, x, keep)
    # float32: the same sums in another order; bfloat16: products of bf16-rounded operands
    assert_matches_reference((got_h, got_final), (want_h, want_final), got_g, want_g, dtype)


def _step_cases():
    cases = [("xla", kind) for kind in GATES]
    if step_kernel.enabled():
        cases += [("step_kernel", kind) for kind in GATES]
    return cases


@pytest.mark.parametrize("name, kind", _step_cases(), ids=lambda v: str(v))
def test_sampling_steps_equal_the_reference(name, kind):
    layers = [_params(kind, V, seed=2), _params(kind, H, seed=3)]
    rng = np.random.default_rng(4)
    w_out = jnp.asarray(rng.uniform(-0.4, 0.4, (H, V)), jnp.float32)
    b_out = jnp.asarray(rng.uniform(-0.3, 0.3, (V,)), jnp.float32)
    tokens = rng.integers(2, V, (6, B)).astype(np.int32)
    carry0 = tuple(tuple(jnp.asarray(rng.uniform(-0.7, 0.7, (B, H)), jnp.float32)
                         for _ in range(cells.state_size(kind))) for _ in layers)

    def reference(carry, tokens):
        x = None
        for t in range(tokens.shape[0]):
            x, new = tokens[t], []
            for i, (p, c) in enumerate(zip(layers, carry)):
                xw = jnp.take(p["w_ih"], x, axis=0) if i == 0 else x @ p["w_ih"]
                c = cells.STEP[kind](p, c, xw)
                new.append(c)
                x = c[-1]
            carry = tuple(new)
        return carry, x @ w_out + b_out[None]

    if name == "xla":
        weights, step = xla.prepare_step(kind, layers, w_out, b_out), functools.partial(xla.step, kind)
    else:
        weights, step = step_kernel.prepare(kind, layers, w_out, b_out), step_kernel.step

    def run(carry, tokens):
        logits = None
        for t in range(tokens.shape[0]):
            carry, logits = step(weights, carry, tokens[t])
        return carry, logits

    want_carry, want_logits = jax.jit(reference)(carry0, tokens)
    got_carry, got_logits = jax.jit(run)(carry0, tokens)
    assert_steps_match(got_carry, got_logits, want_carry, want_logits)


def test_the_chooser_names_what_runs():
    assert backends.training_backend("gru", jnp.float32) == "xla"
    assert backends.training_backend("lstm", jnp.float32) == ("lstm_window" if lstm_window.enabled() else "xla")
    assert backends.sampling_backend(jnp.bfloat16) == "xla"
    assert backends.sampling_backend(jnp.float32) == ("step_kernel" if step_kernel.enabled() else "xla")


def test_the_model_names_no_backend():
    import charrnn.model as model

    source = open(model.__file__).read()
    for name in ("lstm_window", "step_kernel", "bf16_matmul", "amx", "native", "xla", "isinstance"):
        assert name not in source, name


# --- building the native kernels ------------------------------------------------------------

def _kernel_source(tmp_path, monkeypatch, body: str):
    import shutil

    from charrnn.backends import native

    if not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("no C++ compiler here")
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / "k.cc").write_text(body)
    monkeypatch.setattr(native, "KERNELS", src)
    monkeypatch.setenv("CHARRNN_KERNEL_CACHE", str(tmp_path / "cache"))
    return native


def test_a_failed_build_is_remembered_not_retried_by_every_process(tmp_path, monkeypatch):
    native = _kernel_source(tmp_path, monkeypatch, "this is not C++\n")
    calls = []
    real_run = native.subprocess.run
    monkeypatch.setattr(native.subprocess, "run", lambda *a, **k: calls.append(1) or real_run(*a, **k))
    assert native.load("k", [], "nothing") is None
    assert native.load("k", [], "nothing") is None  # a later process: no second compile
    assert len(calls) == 1
    assert list((tmp_path / "cache").glob("k-*.failed"))


def test_a_cached_library_that_cannot_load_is_rebuilt_once(tmp_path, monkeypatch):
    native = _kernel_source(tmp_path, monkeypatch, 'extern "C" int value() { return 7; }\n')
    built = native.build("k", [], "nothing")
    built.write_bytes(b"not a shared library")  # damaged in the cache
    lib = native.load("k", [], "nothing")
    assert lib is not None and lib.value() == 7


def test_charrnn_kernels_0_turns_every_kernel_off(monkeypatch):
    from charrnn.backends import native

    monkeypatch.setenv("CHARRNN_KERNELS", "0")
    assert not native.allowed("CHARRNN_AMX") and not native.allowed("CHARRNN_STEP_KERNEL")
    monkeypatch.delenv("CHARRNN_KERNELS")
    monkeypatch.setenv("CHARRNN_STEP_KERNEL", "0")
    assert native.allowed("CHARRNN_AMX") and not native.allowed("CHARRNN_STEP_KERNEL")

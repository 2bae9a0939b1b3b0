"""The network: cell equations against a numpy reference, scan vs step, resets, dropout, dtypes.

Every test uses the same few shapes (vocabulary 13, hidden 16, two layers, batch 3, window 10)
and jitted entry points with the graph definition static, so the suite compiles each program
once: model code run eagerly recompiles its scan on every call.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from charrnn.config import ModelConfig, TrainConfig
from charrnn.evaluate import make_eval_fn, weighted_nll
from charrnn.backends.bf16_matmul import matmul as _matmul
from charrnn.model import _dropout, abstract_model, build_model, count_params, split_model
from charrnn.vocab import END, START

CELLS = ("rnn", "lstm", "gru")
V = 13  # vocabulary size: 11 characters plus start and end
H = 16
B, T = 3, 10


@functools.lru_cache(maxsize=None)
def _built(cell, seed=0, dropout=0.0):
    return split_model(build_model(ModelConfig(cell=cell, layers=2, hidden=H, dropout=dropout), V, seed))


def _model(cell, seed=0, dropout=0.0):
    """``(graphdef, params)`` of a fresh two-layer model; the params dict is the caller's to change."""
    graphdef, params = _built(cell, seed, dropout)
    return graphdef, jax.tree_util.tree_map(lambda a: a, params)


def _case(cell):
    """A model of ``cell``, a random carry and a window of character tokens to run it on."""
    graphdef, params = _model(cell)
    return graphdef, params, random_carry(graphdef, params), char_tokens()


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("dtype",))
def forward(graphdef, params, carry, tokens, key=None, *, dtype=jnp.float32):
    return nnx.merge(graphdef, params)(carry, tokens, dropout_key=key, dtype=dtype)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("dtype",))
def step(graphdef, params, carry, token_B, *, dtype=jnp.float32):
    return nnx.merge(graphdef, params).step(carry, token_B, dtype)


def zero_carry(graphdef, params, batch=B):
    return nnx.merge(graphdef, params).initial_carry(batch)


def random_carry(graphdef, params, seed=1):
    """A non-zero carry, so tests see that the state passed in is used."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda a: jnp.asarray(rng.uniform(-0.8, 0.8, a.shape).astype(np.float32)),
                                  zero_carry(graphdef, params))


def char_tokens(length=T, seed=2):
    """Random character ids (no start or end token), ``(B, length)``."""
    return np.random.default_rng(seed).integers(2, V, (B, length)).astype(np.int32)


def assert_trees_close(a, b, atol):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), atol=atol, rtol=0)


# --- numpy reference ---------------------------------------------------------------------------


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def reference_forward(cell, params, carry, tokens_BxT):
    """Float64 numpy forward pass from the textbook (PyTorch-convention) equations.

    The input is one-hot (a matmul here, not a gather); a row's state is zeroed when it reads the
    start token.
      RNN:  h' = tanh(x W_ih + b + h W_hh)
      LSTM (gate blocks i, f, g, o):  z = x W_ih + b + h W_hh;  c' = σ(f) c + σ(i) tanh(g);  h' = σ(o) tanh(c')
      GRU (blocks r, z, n):  r = σ(x W_ir + b_ir + h W_hr + b_hr);  z = σ(x W_iz + b_iz + h W_hz + b_hz);
            n = tanh(x W_in + b_in + r (h W_hn + b_hn));  h' = (1 - z) n + z h
    """
    f64 = lambda a: np.asarray(a, dtype=np.float64)  # noqa: E731
    layers = [{k: f64(v) for k, v in params["cells"][i].items()} for i in range(len(params["cells"]))]
    w_out, b_out = f64(params["w_out"]), f64(params["b_out"])
    vocab_size = w_out.shape[1]
    state = [{"c": f64(c[0]), "h": f64(c[1])} if cell == "lstm" else {"h": f64(c[0])} for c in carry]
    batch, length = tokens_BxT.shape
    logits = np.zeros((batch, length, vocab_size))
    for t in range(length):
        tok = np.asarray(tokens_BxT[:, t])
        keep = (tok != START).astype(np.float64)[:, None]
        x = np.eye(vocab_size)[tok]
        for p, s in zip(layers, state):
            for k in s:
                s[k] = s[k] * keep
            h = s["h"]
            n_h = h.shape[1]
            if cell == "rnn":
                h = np.tanh(x @ p["w_ih"] + p["b_ih"] + h @ p["w_hh"])
            elif cell == "lstm":
                z = x @ p["w_ih"] + p["b_ih"] + h @ p["w_hh"]
                i, f, g, o = (z[:, k * n_h:(k + 1) * n_h] for k in range(4))
                s["c"] = _sigmoid(f) * s["c"] + _sigmoid(i) * np.tanh(g)
                h = _sigmoid(o) * np.tanh(s["c"])
            else:
                a = x @ p["w_ih"] + p["b_ih"]
                b = h @ p["w_hh"] + p["b_hh"]
                r = _sigmoid(a[:, :n_h] + b[:, :n_h])
                z = _sigmoid(a[:, n_h:2 * n_h] + b[:, n_h:2 * n_h])
                n = np.tanh(a[:, 2 * n_h:] + r * b[:, 2 * n_h:])
                h = (1.0 - z) * n + z * h
            s["h"] = h
            x = h
        logits[:, t] = x @ w_out + b_out
    final = tuple((s["c"], s["h"]) if cell == "lstm" else (s["h"],) for s in state)
    return final, logits


# --- shapes and parameters -------------------------------------------------------------------


@pytest.mark.parametrize("cell, gates, has_b_hh", [("rnn", 1, False), ("lstm", 4, False), ("gru", 3, True)])
def test_parameter_shapes_and_count(cell, gates, has_b_hh):
    graphdef, params = _model(cell)
    first, second = params["cells"][0], params["cells"][1]
    assert first["w_ih"].shape == (V, gates * H)  # one-hot input: a row per token id
    assert first["w_hh"].shape == (H, gates * H)
    assert second["w_ih"].shape == (H, gates * H)
    assert params["w_out"].shape == (H, V) and params["b_out"].shape == (V,)
    assert ("b_hh" in first) == has_b_hh
    bias = gates * H * (2 if has_b_hh else 1)
    assert count_params(params) == (V * gates * H + H * gates * H + bias) + (2 * H * gates * H + bias) + H * V + V
    # The abstract model has the same structure and shapes and holds no arrays.
    _, abstract = split_model(abstract_model(ModelConfig(cell=cell, layers=2, hidden=H), V))
    assert jax.tree_util.tree_structure(abstract) == jax.tree_util.tree_structure(params)
    for a, p in zip(jax.tree_util.tree_leaves(abstract), jax.tree_util.tree_leaves(params)):
        assert isinstance(a, jax.ShapeDtypeStruct) and a.shape == p.shape and a.dtype == p.dtype == jnp.float32
    carry = zero_carry(graphdef, params)
    assert [len(layer) for layer in carry] == [2 if cell == "lstm" else 1] * 2
    assert all(a.shape == (B, H) and not np.asarray(a).any() for a in jax.tree_util.tree_leaves(carry))


def test_initialisation():
    _, p0 = _model("lstm", seed=0)
    bound = H ** -0.5
    # PyTorch's scheme: weights U(-1/sqrt(H), 1/sqrt(H)); the LSTM's one bias vector is the sum
    # of two such draws (PyTorch's b_ih + b_hh), with no forget-gate offset.
    for layer in p0["cells"].values():
        b = np.asarray(layer["b_ih"])
        assert np.abs(b).max() <= 2 * bound and np.abs(b).max() > bound
        assert abs(b[H:2 * H].mean()) < bound / 2  # the forget gate's block is centred on 0
        for w in ("w_ih", "w_hh"):
            assert bound / 2 < np.abs(np.asarray(layer[w])).max() <= bound
    _, g = _model("gru", seed=0)
    for layer in g["cells"].values():  # the GRU keeps b_ih and b_hh apart, each one draw
        assert all(np.abs(np.asarray(layer[k])).max() <= bound for k in ("b_ih", "b_hh"))
    again = split_model(build_model(ModelConfig(cell="lstm", layers=2, hidden=H), V, 0))[1]
    _, p1 = _model("lstm", seed=1)
    for a, b, c in zip(*(jax.tree_util.tree_leaves(t) for t in (p0, again, p1))):
        np.testing.assert_array_equal(a, b)  # same seed, same parameters
        assert not np.array_equal(a, c)


@pytest.mark.parametrize("cell", CELLS)
def test_initial_loss_is_log_vocab(cell):
    graphdef, params = _model(cell)
    rng = np.random.default_rng(0)
    total = count = 0.0
    carry = zero_carry(graphdef, params)
    for _ in range(20):  # 600 random targets
        x = rng.integers(0, V, (B, T)).astype(np.int32)
        y = rng.integers(1, V, (B, T)).astype(np.int32)
        carry, logits = forward(graphdef, params, carry, x)
        t, c = weighted_nll(logits, y, jnp.ones((B, T), jnp.float32))
        total, count = total + float(t), count + float(c)
    assert count == 20 * B * T
    assert abs(total / count - math.log(V)) < 0.1, total / count


# --- cell equations --------------------------------------------------------------------------


@pytest.mark.parametrize("cell", CELLS)
def test_matches_numpy_reference(cell):
    graphdef, params, carry, tokens = _case(cell)
    tokens[1, 4] = START  # one row restarts mid-window
    tokens[2, 2] = END
    new_carry, logits = forward(graphdef, params, carry, tokens)
    ref_carry, ref_logits = reference_forward(cell, params, carry, tokens)
    assert logits.shape == (B, T, V) and logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits, np.float64), ref_logits, atol=1e-5, rtol=0)
    assert_trees_close(new_carry, ref_carry, atol=1e-5)


@pytest.mark.parametrize("cell", CELLS)
def test_reference_is_sensitive_to_gate_order(cell):
    """Guard for the test above: rotating the gate blocks changes the output, and the model follows."""
    graphdef, params, carry, tokens = _case(cell)
    _, before = reference_forward(cell, params, carry, tokens)
    layer = dict(params["cells"][0])
    gates = layer["w_ih"].shape[1] // H
    if gates == 1:
        layer["w_hh"] = layer["w_hh"].T  # a tanh cell has no gate order; change its recurrence
    else:
        perm = np.concatenate([np.arange(H) + H * ((g + 1) % gates) for g in range(gates)])
        for name in ("w_ih", "w_hh", "b_ih"):
            layer[name] = layer[name][..., perm]
    params["cells"][0] = layer
    _, after_ref = reference_forward(cell, params, carry, tokens)
    _, after = forward(graphdef, params, carry, tokens)
    assert np.abs(after_ref - before).max() > 1e-2
    np.testing.assert_allclose(np.asarray(after, np.float64), after_ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cell", CELLS)
def test_scan_equals_step_by_step(cell):
    graphdef, params, carry, tokens = _case(cell)
    full_carry, full_logits = forward(graphdef, params, carry, tokens)
    c = carry
    step_logits = []
    for t in range(T):
        c, lg = step(graphdef, params, c, tokens[:, t])
        assert lg.shape == (B, V)
        step_logits.append(lg)
    np.testing.assert_allclose(np.stack(step_logits, axis=1), full_logits, atol=1e-6, rtol=0)
    assert_trees_close(c, full_carry, atol=1e-6)


@pytest.mark.parametrize("cell", CELLS)
def test_state_resets_at_start_token(cell):
    graphdef, params, carry, tokens = _case(cell)
    tokens[:, 4] = START  # 4 characters of an earlier document, then a new one of 5
    c_mid, logits_mid = forward(graphdef, params, carry, tokens)
    # The new document read from a fresh state, one token at a time.
    c = zero_carry(graphdef, params)
    fresh = []
    for t in range(4, T):
        c, lg = step(graphdef, params, c, tokens[:, t])
        fresh.append(lg)
    np.testing.assert_allclose(logits_mid[:, 4:], np.stack(fresh, axis=1), atol=1e-6, rtol=0)
    assert_trees_close(c_mid, c, atol=1e-6)
    # Before the start token the history matters, so the equality above is not trivial.
    _, logits_other = forward(graphdef, params, random_carry(graphdef, params, seed=9), tokens)
    assert np.abs(np.asarray(logits_other[:, :4] - logits_mid[:, :4])).max() > 1e-3
    np.testing.assert_allclose(logits_other[:, 4:], logits_mid[:, 4:], atol=1e-6, rtol=0)


def test_rows_are_independent():
    graphdef, params = _model("gru")
    carry = random_carry(graphdef, params)
    tokens = char_tokens()
    _, logits = forward(graphdef, params, carry, tokens)
    other = tokens.copy()
    other[0] = char_tokens(seed=7)[0]
    _, logits2 = forward(graphdef, params, carry, other)
    np.testing.assert_array_equal(logits[1:], logits2[1:])
    assert not np.array_equal(logits[0], logits2[0])


# --- gradients ------------------------------------------------------------------------------------


def autodiff_reference(cell, params, carry, tokens_BxT):
    """The reference equations in jax.numpy under a plain ``lax.scan``, for ordinary autodiff."""
    vocab_size = params["w_out"].shape[1]
    keep_TxBx1 = (tokens_BxT.T != START).astype(jnp.float32)[..., None]
    x_TxBxI = jax.nn.one_hot(tokens_BxT.T, vocab_size, dtype=jnp.float32)
    new_carry = []
    for i, c0 in enumerate(carry):
        p = params["cells"][i]

        def body(s, inp, p=p):
            x, keep = inp
            s = tuple(a * keep for a in s)
            h = s[-1]
            if cell == "rnn":
                h = jnp.tanh(x @ p["w_ih"] + p["b_ih"][None, :] + h @ p["w_hh"])
                s = (h,)
            elif cell == "lstm":
                i_, f, g, o = jnp.split(x @ p["w_ih"] + p["b_ih"][None, :] + h @ p["w_hh"], 4, axis=-1)
                c = jax.nn.sigmoid(f) * s[0] + jax.nn.sigmoid(i_) * jnp.tanh(g)
                h = jax.nn.sigmoid(o) * jnp.tanh(c)
                s = (c, h)
            else:
                ar, az, an = jnp.split(x @ p["w_ih"] + p["b_ih"][None, :], 3, axis=-1)
                br, bz, bn = jnp.split(h @ p["w_hh"] + p["b_hh"][None, :], 3, axis=-1)
                r, z = jax.nn.sigmoid(ar + br), jax.nn.sigmoid(az + bz)
                n = jnp.tanh(an + r * bn)
                h = (1.0 - z) * n + z * h
                s = (h,)
            return s, h

        c, x_TxBxI = jax.lax.scan(body, tuple(c0), (x_TxBxI, keep_TxBx1))
        new_carry.append(c)
    logits_TxBxV = x_TxBxI @ params["w_out"] + params["b_out"][None, None, :]
    return tuple(new_carry), jnp.swapaxes(logits_TxBxV, 0, 1)


def _probe_loss(forward_fn, params, carry, tokens, weights):
    """A scalar that reads every output: logits and the final carry, with fixed random weights."""
    new_carry, logits = forward_fn(params, carry, tokens)
    w_logits, w_carry = weights
    total = jnp.sum(logits * w_logits)
    for a, w in zip(jax.tree_util.tree_leaves(new_carry), jax.tree_util.tree_leaves(w_carry)):
        total = total + jnp.sum(a * w)
    return total


@pytest.mark.parametrize("cell", CELLS)
def test_gradients_match_autodiff_of_the_equations(cell):
    """The scan's hand-written backward pass against autodiff of the plain recurrence."""
    graphdef, params, carry, tokens = _case(cell)
    tokens[1, 4] = START  # the reset must also stop gradients flowing back past it
    tokens[0, 0] = START
    rng = np.random.default_rng(5)
    weights = (jnp.asarray(rng.normal(size=(B, T, V)).astype(np.float32)),
               jax.tree_util.tree_map(lambda a: jnp.asarray(rng.normal(size=a.shape).astype(np.float32)), carry))

    model_fn = lambda p, c, t: nnx.merge(graphdef, p)(c, t)  # noqa: E731
    ref_fn = functools.partial(autodiff_reference, cell)
    grad = jax.jit(jax.value_and_grad(_probe_loss, argnums=(1, 2)), static_argnums=0)
    v_model, g_model = grad(model_fn, params, carry, tokens, weights)
    v_ref, g_ref = grad(ref_fn, params, carry, tokens, weights)
    np.testing.assert_allclose(v_model, v_ref, rtol=1e-5)  # the forward values agree too
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g_model)[0], jax.tree_util.tree_leaves(g_ref)):
        scale = max(1.0, float(np.abs(np.asarray(b)).max()))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5 * scale, rtol=0,
                                   err_msg=jax.tree_util.keystr(path))
    # Row 0 starts with a start token: nothing flows back into its initial state.
    for leaf in jax.tree_util.tree_leaves(g_model[1]):
        assert not np.asarray(leaf)[0].any()
        assert np.abs(np.asarray(leaf)[2]).max() > 0


# --- dropout and dtypes ----------------------------------------------------------------------


def test_dropout_only_with_a_key():
    g_drop, params = _model("lstm", dropout=0.5)
    g_plain, plain_params = _model("lstm", dropout=0.0)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(plain_params)):
        np.testing.assert_array_equal(a, b)  # dropout does not change the initialisation
    carry = random_carry(g_drop, params)
    tokens = char_tokens()
    _, no_key = forward(g_drop, params, carry, tokens)
    _, plain = forward(g_plain, params, carry, tokens)
    np.testing.assert_array_equal(no_key, plain)
    k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    _, d1 = forward(g_drop, params, carry, tokens, k1)
    _, d1b = forward(g_drop, params, carry, tokens, k1)
    _, d2 = forward(g_drop, params, carry, tokens, k2)
    np.testing.assert_array_equal(d1, d1b)
    assert np.abs(np.asarray(d1 - no_key)).max() > 1e-3
    assert np.abs(np.asarray(d1 - d2)).max() > 1e-3


def test_dropout_mask_and_scale():
    x = jnp.asarray(np.random.default_rng(0).uniform(0.5, 1.5, (50, 40)).astype(np.float32))
    np.testing.assert_array_equal(_dropout(x, 0.3, None), x)
    np.testing.assert_array_equal(_dropout(x, 0.0, jax.random.PRNGKey(0)), x)
    y = np.asarray(_dropout(x, 0.3, jax.random.PRNGKey(0)))
    kept = y != 0
    np.testing.assert_allclose(y[kept], np.asarray(x)[kept] / 0.7, rtol=1e-6)
    assert abs(kept.mean() - 0.7) < 0.03


def test_dropout_of_a_devices_rows_is_those_rows_of_the_whole_batch():
    # Data parallel: a device holding rows 3..5 of 8 drops exactly what one device would.
    x = jnp.asarray(np.random.default_rng(1).uniform(0.5, 1.5, (7, 8, 16)).astype(np.float32))
    key = jax.random.PRNGKey(3)
    whole = np.asarray(_dropout(x, 0.25, key))
    part = np.asarray(jax.jit(lambda x, first: _dropout(x, 0.25, key, rows=(first, 8)))(x[:, 3:6], 3))
    np.testing.assert_array_equal(part, whole[:, 3:6])
    assert 0.6 < (whole != 0).mean() < 0.9
    assert not np.array_equal(whole[:, 0] != 0, whole[:, 1] != 0)  # rows draw different masks


@pytest.mark.parametrize("cell", CELLS)
def test_bfloat16_close_to_float32(cell):
    graphdef, params, carry, tokens = _case(cell)
    _, f32 = forward(graphdef, params, carry, tokens)
    c16, b16 = forward(graphdef, params, carry, tokens, dtype=jnp.bfloat16)
    assert b16.dtype == jnp.float32  # bf16 operands, float32 results and state
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(c16))
    diff = np.abs(np.asarray(b16 - f32))
    assert diff.max() < 0.05
    assert diff.max() > 0  # the bf16 path really computes in lower precision
    _, s16 = step(graphdef, params, carry, tokens[:, 0], dtype=jnp.bfloat16)
    np.testing.assert_allclose(s16, b16[:, 0], atol=1e-5, rtol=0)


# --- silent broadcasts -------------------------------------------------------------------------


@pytest.mark.slow
def test_model_is_rank_promotion_clean(strict_broadcasts):
    from charrnn import sample as sampler
    from charrnn.train_step import init_state, make_optimizer, make_train_step

    tokens = jnp.asarray(char_tokens())
    for cell in CELLS:
        graphdef, params = _model(cell)
        model = nnx.merge(graphdef, params)
        model(model.initial_carry(B), tokens)
        model.step(model.initial_carry(B), tokens[:, 0])
    # The training step, evaluation and sampler around the last model.
    cfg = TrainConfig(batch_size=B, seq_len=T)
    opt = make_optimizer(cfg, 1e-3)
    graphdef, state = init_state(model, opt, 0)
    train_step = make_train_step(graphdef, opt, cfg, jit=False)
    train_step(state, model.initial_carry(B), (tokens, tokens, jnp.bool_(True)))
    make_eval_fn(graphdef)(state.params, model.initial_carry(B), tokens[None], tokens[None],
                           jnp.ones((1, B, T), jnp.float32))
    prime, generate = sampler.make_sampler(lambda c, t: nnx.merge(graphdef, state.params).step(c, t), chunk=4)
    s = prime(model.initial_carry(2), jnp.asarray(sampler.prompt_tokens(np.array([2], np.int32), 2)),
              jax.random.PRNGKey(0))
    generate(s, sampler.make_controls(V, top_k=3, top_p=0.9))


@pytest.mark.parametrize("cell", CELLS)
def test_sampler_with_prepared_weights_equals_plain_steps(cell):
    # sample.model_step_fn's loops prepare the weights once (CharRNN.step_weights) and run
    # step_with; a plain step_fn runs CharRNN.step on the parameters every step. Same tokens.
    from charrnn import sample as sampler

    graphdef, params = _model(cell)
    model = nnx.merge(graphdef, params)
    weights = model.step_weights()  # what step() prepares: the same path
    tok = jnp.asarray(char_tokens())[:, 0]
    for a, b in zip(jax.tree_util.tree_leaves(model.step(model.initial_carry(B), tok)),
                    jax.tree_util.tree_leaves(model.step_with(weights, model.initial_carry(B), tok))):
        np.testing.assert_array_equal(a, b)
    plain = sampler.make_sampler(lambda c, t: (lambda s, lg: ((c[0], s), lg))(
        *nnx.merge(graphdef, c[0]).step(c[1], t)), chunk=8)
    prepared_fn = sampler.model_step_fn(graphdef)
    assert hasattr(prepared_fn, "prepare")
    prepared = sampler.make_sampler(prepared_fn, chunk=8)
    prompt = jnp.asarray(sampler.prompt_tokens(np.array([2, 3], np.int32), 4))
    controls = sampler.make_controls(V, temperature=1.5)
    out = []
    for prime, generate in (plain, prepared):
        s = prime((params, model.initial_carry(4)), prompt, jax.random.PRNGKey(3))
        toks = []
        for _ in range(3):
            s, t = generate(s, controls)
            toks.append(np.asarray(t))
        out.append((np.concatenate(toks, axis=1), np.asarray(s.logits_BxV)))
    np.testing.assert_array_equal(out[0][0], out[1][0])
    np.testing.assert_allclose(out[0][1], out[1][1], rtol=1e-6, atol=1e-6)
    assert len(np.unique(out[0][0])) > 2


def test_a_projection_over_steps_has_a_plain_weight_gradient():
    # model._matmul on a (T, B, K) input: the same values and gradients as x @ w, and the
    # compiled gradient copies no transposed (N, T, B) cotangent (XLA:CPU did for the 3-D dot:
    # ~3.4 ms of a char-rnn-default step for layer 2's w_ih).
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((6, 5, 24)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((24, 64)), jnp.float32)
    proj = jnp.asarray(rng.standard_normal((6, 5, 64)), jnp.float32)

    def loss(matmul):
        return lambda x, w: jnp.sum(jnp.sin(matmul(x, w)) * proj)

    ours = jax.jit(jax.grad(loss(lambda x, w: _matmul(x, w, jnp.float32)), argnums=(0, 1)))
    for g, r in zip(ours(x, w), jax.grad(loss(lambda x, w: x @ w), argnums=(0, 1))(x, w)):
        assert g.shape == r.shape
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(_matmul(x, w, jnp.float32)), np.asarray(x @ w), rtol=1e-6, atol=1e-5)
    hlo = ours.lower(x, w).compile().as_text()
    assert not [line for line in hlo.splitlines() if "transpose(" in line and "f32[64,6,5]" in line]

"""The sampler, driven by a fake ``step_fn`` whose logits are a lookup table: exact tokens.

The table rides in the carry, so one compiled sampler serves every test (and every Hypothesis
example): the logits for the next token are ``table[previous token]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from charrnn import beam as beam_mod
from charrnn import sample as sampler
from charrnn.vocab import END, START

V = 8  # ids 0 (start), 1 (end), 2..7 characters
ROWS = 64
CHUNK = 16

pytestmark = pytest.mark.usefixtures("strict_broadcasts")


def table_step(carry, token_B):
    (table_VxV,) = carry
    return carry, table_VxV[token_B]


PRIME, GENERATE = sampler.make_sampler(table_step, chunk=CHUNK)


def draw(table, seed=0, length=CHUNK, rows=ROWS, **controls):
    """Tokens ``(rows, length)`` generated from the start token with the given controls."""
    prompt = sampler.prompt_tokens(np.zeros(0, np.int32), rows)
    pieces = sampler.generate_stream(PRIME, GENERATE, (jnp.asarray(table, jnp.float32),), prompt,
                                     jax.random.PRNGKey(seed), sampler.make_controls(V, **controls), length)
    return np.concatenate(list(pieces), axis=1)


def chain_table():
    """START -> 2 -> 3 -> ... -> 7 -> END as the clear argmax of every row, with close seconds."""
    rng = np.random.default_rng(0)
    t = rng.uniform(-1.0, 0.0, (V, V)).astype(np.float32)
    nxt = {START: 2, **{i: i + 1 for i in range(2, V - 1)}, V - 1: END, END: END}
    for a, b in nxt.items():
        t[a, b] = 0.5
    return t


GREEDY_CHAIN = [2, 3, 4, 5, 6, 7, END]


def test_greedy_picks_the_argmax():
    toks = draw(chain_table(), greedy=True)
    assert toks.shape == (ROWS, CHUNK)
    expected = GREEDY_CHAIN + [END] * (CHUNK - len(GREEDY_CHAIN))
    assert (toks == np.asarray(expected)).all()


@pytest.mark.parametrize("controls", [dict(top_k=1), dict(top_p=1e-6), dict(temperature=1e-3),
                                      dict(top_k=1, temperature=5.0), dict(top_k=3, top_p=1e-6)])
@pytest.mark.parametrize("seed", [0, 1])
def test_degenerate_sampling_equals_greedy(controls, seed):
    greedy = draw(chain_table(), greedy=True)
    np.testing.assert_array_equal(draw(chain_table(), seed=seed, **controls), greedy)


def test_sampling_is_not_greedy():
    toks = draw(chain_table(), seed=0)
    assert not (toks == draw(chain_table(), greedy=True)).all()


def test_start_token_is_never_produced():
    t = np.zeros((V, V), np.float32)
    t[:, START] = 20.0  # overwhelmingly the most likely, yet invalid
    for controls in (dict(), dict(greedy=True), dict(top_k=1), dict(top_p=0.1), dict(temperature=100.0)):
        toks = draw(t, **controls)
        assert not (toks == START).any(), controls
    # With the start token out, every other id ties; the argmax takes the first, the end token.
    assert (draw(t, greedy=True) == END).all()


def test_after_the_end_token_only_end_tokens():
    t = np.zeros((V, V), np.float32)
    t[:, END] = 1.0  # ends after ~3 characters on average
    toks = draw(t, seed=3, length=48)
    ended = toks == END
    first = np.where(ended.any(axis=1), ended.argmax(axis=1), toks.shape[1])
    assert (first < toks.shape[1]).sum() >= ROWS - 2
    for row, f in zip(toks, first):
        assert (row[f:] == END).all()
        assert (row[:f] >= 2).all()
    assert len({tuple(r) for r in toks}) > 10  # the rows really are different draws


def test_generation_stops_when_every_row_has_ended():
    t = np.zeros((V, V), np.float32)
    t[:, END] = 50.0
    toks = draw(t, seed=0, length=10 * CHUNK)
    assert toks.shape == (ROWS, CHUNK)  # one chunk, not ten
    assert (toks == END).all()


def test_length_is_exact_across_chunks():
    t = np.zeros((V, V), np.float32)
    t[:, END] = -50.0
    toks = draw(t, seed=0, length=CHUNK + 5)
    assert toks.shape == (ROWS, CHUNK + 5) and (toks >= 2).all()


def test_same_seed_same_samples_different_seed_different():
    t = np.zeros((V, V), np.float32)
    t[:, END] = -50.0
    a, b, c = draw(t, seed=7), draw(t, seed=7), draw(t, seed=8)
    np.testing.assert_array_equal(a, b)
    assert (a != c).mean() > 0.5


def test_draws_follow_the_softmax():
    logits = np.array([0.0, -50.0, 2.0, 1.0, 0.0, -1.0, -50.0, -50.0], np.float32)
    t = np.tile(logits, (V, 1))
    toks = draw(t, seed=0).ravel()
    p = np.exp(logits[2:]) / np.exp(logits[2:]).sum()  # START is excluded, not just unlikely
    freq = np.bincount(toks, minlength=V)[2:] / toks.size
    np.testing.assert_allclose(freq, p, atol=0.04)
    # top-k 2 keeps ids 2 and 3, renormalised.
    toks = draw(t, seed=1, top_k=2).ravel()
    assert set(np.unique(toks).tolist()) == {2, 3}
    assert abs((toks == 2).mean() - np.e / (np.e + 1)) < 0.05
    # Temperature 2 flattens: the ratio of the two best is e^(1/2).
    toks = draw(t, seed=2, temperature=2.0, top_k=2).ravel()
    assert abs((toks == 2).mean() - np.exp(0.5) / (np.exp(0.5) + 1)) < 0.05


FILTER = jax.jit(sampler.filter_logits)  # one compile per shape, not one per eager operation


def _filtered(logits, **controls):
    out = FILTER(jnp.asarray([logits], jnp.float32), sampler.make_controls(len(logits), **controls))
    return np.isfinite(np.asarray(out[0]))


def test_rows_of_a_split_batch_draw_what_the_whole_batch_draws():
    logits = jax.random.normal(jax.random.PRNGKey(1), (12, V)) * 2.0
    key = jax.random.PRNGKey(5)
    controls = sampler.make_controls(V, 1.3)
    def draw(rows_BxV, rows=None):
        (noise_BxV,) = sampler.gumbel_noise(key, 1, rows_BxV.shape, rows)
        return sampler.pick(rows_BxV, noise_BxV, controls)

    whole = draw(logits)
    # The draw is jax.random.categorical's, written out.
    expected = jax.random.categorical(key, sampler.filter_logits(logits, controls), axis=-1)
    np.testing.assert_array_equal(whole, expected)
    parts = [draw(logits[i:i + 4], rows=(i, 12)) for i in (0, 4, 8)]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    assert len(set(np.asarray(whole).tolist())) > 1


def test_noise_steps_fit_the_budget_and_divide_the_chunk():
    assert sampler.noise_steps(128, 1, 67) == 128
    assert sampler.noise_steps(128, 32, 67) == 128  # 1.1 MB
    assert sampler.noise_steps(128, 1024, 67) == 16  # 16 x 1024 x 67 x 4 B = 4.4 MB <= 8 MiB
    assert sampler.noise_steps(128, 10 ** 6, 67) == 1  # never fewer than one step
    assert sampler.noise_steps(96, 1, 67) == 32  # a power of two that divides the chunk
    assert sampler.noise_steps(16, 64, 8, budget=64 * 8 * 4 * 4) == 4


def test_noise_drawn_in_several_blocks_per_chunk_is_fresh_in_each(monkeypatch):
    """With a noise budget of 4 steps, a 16-step chunk is four blocks: no block may reuse
    another's noise, and the draws still follow the softmax."""
    monkeypatch.setattr(sampler, "NOISE_BYTES", 4 * ROWS * V * 4)
    assert sampler.noise_steps(CHUNK, ROWS, V) == 4
    prime, generate = sampler.make_sampler(table_step, chunk=CHUNK)
    logits = np.array([0.0, -50.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], np.float32)  # uniform over 2..7
    prompt = sampler.prompt_tokens(np.zeros(0, np.int32), ROWS)
    state = prime((jnp.asarray(np.tile(logits, (V, 1))),), jnp.asarray(prompt), jax.random.PRNGKey(0))
    _, toks = generate(state, sampler.make_controls(V))
    toks = np.asarray(toks)
    blocks = [toks[:, i:i + 4] for i in range(0, CHUNK, 4)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert (blocks[i] != blocks[j]).mean() > 0.5, (i, j)
    counts = np.bincount(toks.ravel(), minlength=V)[2:] / toks.size
    np.testing.assert_allclose(counts, 1 / 6, atol=0.03)


def test_filter_logits_exact_sets():
    logits = [5.0, 0.0, np.log(0.5), np.log(0.3), np.log(0.2), -np.inf]
    assert _filtered(logits).tolist() == [False, True, True, True, True, False]
    assert _filtered(logits, top_k=2).tolist() == [False, True, True, False, False, False]
    # Probabilities over ids 1..4 (START removed): [1, .5, .3, .2] / 2.
    assert _filtered(logits, top_p=0.5).tolist() == [False, True, False, False, False, False]
    assert _filtered(logits, top_p=0.51).tolist() == [False, True, True, False, False, False]
    assert _filtered(logits, top_p=0.9).tolist() == [False, True, True, True, False, False]
    assert _filtered(logits, top_k=50).tolist() == _filtered(logits).tolist()
    # Ties at the threshold are all kept.
    tied = [0.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert _filtered(tied, top_k=1).tolist() == [False, True, True, True, False, False]
    assert _filtered(tied, top_p=0.01).tolist() == [False, True, True, True, False, False]
    # The surviving logits less the row's best are divided by the temperature, unchanged otherwise.
    out = FILTER(jnp.asarray([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]]), sampler.make_controls(6, temperature=0.5))
    assert np.asarray(out).tolist() == [[-np.inf, -8.0, -6.0, -4.0, -2.0, 0.0]]


def test_skipping_the_sort_without_top_k_or_top_p_changes_nothing():
    """filter_logits skips sorting when neither top-k nor top-p is set; the sort would have
    removed nothing (ties and -inf included)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (16, 9)).astype(np.float32)
    logits[::3, 4] = logits[::3, 5]  # ties
    logits[1, 6] = -np.inf
    base = (jnp.asarray(logits) - jnp.asarray(logits)[:, 1:].max(axis=1, keepdims=True)) / 0.7
    base = base.at[:, START].set(-jnp.inf)
    full = jax.jit(sampler._top_k_top_p)(base, sampler.make_controls(9, temperature=0.7))
    skipped = FILTER(jnp.asarray(logits), sampler.make_controls(9, temperature=0.7))
    np.testing.assert_array_equal(np.asarray(full), np.asarray(base))
    np.testing.assert_array_equal(np.asarray(skipped), np.asarray(base))


def test_prompt_tokens():
    p = sampler.prompt_tokens(np.array([5, 6], np.int32), 3)
    assert p.dtype == np.int32 and p.tolist() == [[START, 5, 6]] * 3


def test_priming_reads_the_whole_prompt():
    """The first generated token follows the last prompt token, not the start token."""
    prompt = np.tile(np.array([START, 4], np.int32), (ROWS, 1))
    state = PRIME((jnp.asarray(chain_table()),), jnp.asarray(prompt), jax.random.PRNGKey(0))
    _, toks = GENERATE(state, sampler.make_controls(V, greedy=True))
    assert np.asarray(toks)[0, :4].tolist() == [5, 6, 7, END]


@given(st.integers(0, 2 ** 31 - 1), st.floats(0.2, 3.0), st.integers(1, V), st.floats(0.05, 1.0),
       st.integers(0, 1000))
def test_same_seed_is_identical_property(seed, temperature, top_k, top_p, table_seed):
    t = np.random.default_rng(table_seed).normal(0, 2, (V, V)).astype(np.float32)
    controls = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    a = draw(t, seed=seed, rows=4, **controls)
    b = draw(t, seed=seed, rows=4, **controls)
    np.testing.assert_array_equal(a, b)
    assert not (a == START).any()
    for row in a:  # after an end token, only end tokens
        ends = np.flatnonzero(row == END)
        if ends.size:
            assert (row[ends[0]:] == END).all()


def test_beam_search_finds_the_most_probable_sequences():
    logits = np.array([0.0, -1e4, 3.0, 2.0, 0.0, -1.0, -2.0, -3.0], np.float32)
    logp = logits - np.log(np.exp(logits[1:]).sum())  # START excluded

    def step(carry, tok):
        return carry, jnp.broadcast_to(jnp.asarray(logits), (tok.shape[0], V))

    search = beam_mod.make_beam_search(step, beam=3, length=2)
    result = jax.device_get(search((jnp.zeros((1, 1)),), jnp.asarray(logits)[None]))
    order = beam_mod.rank_beams(result)
    seqs = [tuple(np.asarray(result.tokens_KxL)[i].tolist()) for i in order]
    assert seqs[0] == (2, 2) and set(seqs[1:]) == {(2, 3), (3, 2)}
    np.testing.assert_allclose(np.asarray(result.logprob_K)[order],
                               [2 * logp[2], logp[2] + logp[3], logp[2] + logp[3]], rtol=1e-5)
    assert not np.asarray(result.ended_K).any() and np.asarray(result.length_K).tolist() == [2, 2, 2]


@pytest.mark.parametrize("seed", [0, 1, 7, 2 ** 31 - 1, 2 ** 32 - 1])
def test_seed_key_is_the_key_jax_makes_from_the_seed(seed):
    # Built in numpy (no compiled op before the first character); below 2**32 every seed gives
    # exactly the key jax.random.PRNGKey gives, so existing seeds sample what they sampled.
    key = sampler.seed_key(seed)
    want = jax.random.PRNGKey(seed)
    assert np.asarray(key).dtype == want.dtype and np.asarray(key).shape == want.shape
    np.testing.assert_array_equal(np.asarray(key), np.asarray(want))

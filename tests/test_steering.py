"""Steering the sampler: per-row keys and controls, penalties, stop strings, prompt padding,
rows joining and leaving a batch, and 64-bit seeds.

Most tests drive the sampler with fake ``step_fn``s (exact and fast); a few use a tiny trained
run through ``charrnn.load`` and the CLI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from click.testing import CliRunner

import charrnn
from charrnn import prng
from charrnn import sample as sampler
from charrnn.cli import cli
from charrnn.config import ModelConfig, RunConfig, SampleConfig, TrainConfig
from charrnn.errors import CharrnnError
from charrnn.vocab import END, START, Vocab

V = 8  # ids 0 (start), 1 (end), 2..7 characters
CHUNK = 32


def table_step(carry, token_B):
    """Logits ``table[previous token]``; the table rides in the carry (shared by all rows)."""
    (table_VxV,) = carry
    return carry, table_VxV[token_B]


SAMPLERS = {}


def fns(penalties=False, chunk=CHUNK):
    if (penalties, chunk) not in SAMPLERS:
        SAMPLERS[penalties, chunk] = sampler.make_sampler(table_step, chunk=chunk, penalties=penalties)
    return SAMPLERS[penalties, chunk]


def draw(table, keys, controls, length=CHUNK, penalties=False, chunk=CHUNK, prompt=None, counts=None, rows=None):
    rows = rows or len(keys)
    prompt = sampler.prompt_tokens(np.zeros(0, np.int32), rows) if prompt is None else prompt
    prime, generate = fns(penalties, chunk)
    pieces = sampler.generate_stream(prime, generate, (jnp.asarray(table, jnp.float32),), prompt, keys, controls,
                                     length, counts)
    out = np.concatenate(list(pieces), axis=1)
    return np.pad(out, ((0, 0), (0, length - out.shape[1])), constant_values=END)


def random_table(seed=0, no_end=True):
    t = np.random.default_rng(seed).normal(0, 2, (V, V)).astype(np.float32)
    if no_end:
        t[:, END] = -30.0
    return t


def loop_table():
    """Greedy decoding loops 2 -> 3 -> 2 -> 3 ... (the end token is never likely)."""
    t = np.random.default_rng(1).uniform(0.0, 1.0, (V, V)).astype(np.float32)
    t[:, END] = -30.0
    t[START, 2] = t[2, 3] = t[3, 2] = 2.0
    return t


def longest_repeat(seq) -> int:
    """Length of the longest substring occurring at least twice (overlaps allowed)."""
    s = "".join(chr(65 + int(x)) for x in seq)
    best = 0
    for n in range(1, len(s)):
        seen = set()
        if not any(s[i:i + n] in seen or seen.add(s[i:i + n]) for i in range(len(s) - n + 1)):
            break
        best = n
    return best


# --- keys and seeds ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 7, 2 ** 31 - 1, 2 ** 32 - 1])
def test_key_from_seed_is_prngkey_below_2_to_32(seed):
    np.testing.assert_array_equal(prng.key_from_seed(seed), np.asarray(jax.random.PRNGKey(seed)))


def test_every_64_bit_seed_has_its_own_key():
    keys = {tuple(prng.key_from_seed(s)) for s in (0, 2 ** 32, 2 ** 40, 2 ** 64 - 1, 2 ** 63)}
    assert len(keys) == 5
    assert prng.key_from_seed(2 ** 40).tolist() == [2 ** 8, 0]


@pytest.mark.parametrize("bad", [-1, 2 ** 64, True, 1.0, "3", None])
def test_seeds_outside_the_range_are_refused(bad):
    with pytest.raises(CharrnnError, match=r"2\*\*64"):
        prng.key_from_seed(bad)


def test_fold_in_in_numpy_is_jax_fold_in():
    key = prng.key_from_seed(2 ** 40 + 12345)
    data = np.array([0, 1, 5, 2 ** 31 + 3, 2 ** 32 - 1], np.uint64)
    want = np.stack([np.asarray(jax.random.fold_in(jnp.asarray(key), int(d))) for d in data])
    np.testing.assert_array_equal(prng.fold_in(key, data), want)
    rows = np.stack([np.asarray(jax.random.fold_in(jnp.asarray(key), i)) for i in (2, 3, 4)])
    np.testing.assert_array_equal(prng.row_keys(2 ** 40 + 12345, 3, first=2), rows)


def test_seeds_0_and_2_to_40_sample_differently():
    controls = sampler.make_controls(V)
    a = draw(random_table(), prng.row_keys(0, 4), controls)
    b = draw(random_table(), prng.row_keys(2 ** 40, 4), controls)
    assert (a != b).mean() > 0.5


# --- per-row independence ----------------------------------------------------------------------


def test_a_row_draws_the_same_alone_in_a_batch_in_any_slot_and_chunk():
    table = random_table(3)
    keys = prng.row_keys(42, 5)
    mixed = sampler.make_controls(V, temperature=[0.7, 1.3, 1.0, 2.0, 0.5], top_k=[None, 3, None, 2, None],
                                  top_p=[1.0, None, 0.8, None, 0.9], greedy=[False, False, False, True, False])
    batch = draw(table, keys, mixed, length=96)
    assert len({tuple(r) for r in batch}) == 5
    for i in range(5):
        alone = sampler.take_rows(mixed, [i])
        np.testing.assert_array_equal(draw(table, keys[i:i + 1], alone, length=96), batch[i:i + 1])
        # Another slot of another batch, with other rows beside it, and another chunk size.
        order = [(i + 2) % 5, i, (i + 1) % 5]
        other = draw(table, keys[order], sampler.take_rows(mixed, order), length=96, chunk=128)
        np.testing.assert_array_equal(other[1], batch[i])
        for chunk in (16, 24):  # 24: a chunk that is not whole noise blocks draws the same
            np.testing.assert_array_equal(draw(table, keys[i:i + 1], alone, length=96, chunk=chunk), batch[i:i + 1])


def test_one_key_means_row_i_draws_from_fold_in_key_i():
    table = random_table(4)
    controls = sampler.make_controls(V, temperature=1.5)
    one = draw(table, jax.random.PRNGKey(9), controls, rows=3)
    np.testing.assert_array_equal(one, draw(table, prng.row_keys(9, 3), controls))


ROW_TABLE = jnp.asarray(np.random.default_rng(8).normal(0, 2, (V, V)).astype(np.float32)).at[:, END].set(-30.0)


def row_step(carry, token_B):
    """A per-row carry (the running sum of the tokens read) choosing a row of a random table."""
    (sum_B,) = carry
    sum_B = sum_B + token_B
    return (sum_B,), ROW_TABLE[sum_B % V]


row_step.row_carry = True  # the whole carry is per-row: take_rows may slice it; prime resets it


def test_rows_leave_and_join_between_chunks():
    """take_rows / concat_rows between chunks: every row continues exactly as it would alone."""
    prime, generate = sampler.make_sampler(row_step, chunk=CHUNK, penalties=True)
    controls = sampler.make_controls(V, temperature=[1.0, 0.8, 1.2], frequency=[0.0, 0.5, 1.0], rows=3)
    prompt = sampler.prompt_tokens(np.array([3], np.int32), 3)
    keys = prng.row_keys(11, 3)
    zero = (jnp.zeros(1, jnp.int32),)

    def alone(i, chunks):
        s = prime(zero, prompt[:1], keys[i:i + 1])
        c = sampler.take_rows(controls, [i])
        out = []
        for _ in range(chunks):
            s, t = generate(s, c)
            out.append(np.asarray(t))
        return np.concatenate(out, axis=1)[0]

    s = prime((jnp.zeros(2, jnp.int32),), prompt[:2], keys[:2])
    s, t0 = generate(s, sampler.take_rows(controls, [0, 1]))
    s = sampler.take_rows(s, [1])  # row 0 leaves
    s = sampler.concat_rows([s, prime(zero, prompt[:1], keys[2:3])])  # row 2 joins
    c = sampler.concat_rows([sampler.take_rows(controls, [1]), sampler.take_rows(controls, [2])])
    s, t1 = generate(s, c)
    t0, t1 = np.asarray(t0), np.asarray(t1)
    np.testing.assert_array_equal(t0[0], alone(0, 1))
    np.testing.assert_array_equal(np.concatenate([t0[1], t1[0]]), alone(1, 2))
    np.testing.assert_array_equal(t1[1], alone(2, 1))
    assert len(set(t1[1].tolist())) > 2


# --- temperature numerics ----------------------------------------------------------------------


def test_tiny_temperature_is_greedy_and_huge_is_uniform_never_nan():
    table = random_table(6)
    keys = prng.row_keys(3, 16)
    greedy = draw(table, keys, sampler.make_controls(V, greedy=True), length=64)
    np.testing.assert_array_equal(draw(table, keys, sampler.make_controls(V, temperature=1e-30), length=64), greedy)
    np.testing.assert_array_equal(draw(table, keys, sampler.make_controls(V, temperature=1e-45), length=64), greedy)
    filt = jax.jit(sampler.filter_logits)
    for t in (1e-30, 1e-45, 1e30, 3e38):
        out = np.asarray(filt(jnp.asarray(table), sampler.make_controls(V, temperature=t)))
        assert not np.isnan(out).any(), t
        assert np.isneginf(out[:, START]).all()
    # A huge temperature: every character (the end token too) about equally likely.
    toks = draw(np.where(np.arange(V) == END, 0.0, table), prng.row_keys(4, 64),
                sampler.make_controls(V, temperature=1e30), length=CHUNK)
    first = toks[:, 0]
    assert set(np.unique(first)) <= set(range(1, V)) and len(np.unique(first)) >= 5


# --- penalties ---------------------------------------------------------------------------------


@pytest.mark.parametrize("controls", [dict(), dict(temperature=0.7, top_k=3), dict(top_p=0.8), dict(greedy=True)])
def test_zero_penalties_give_the_plain_programs_tokens_bit_for_bit(controls):
    table = random_table(7, no_end=False)
    keys = prng.row_keys(5, 16)
    c = sampler.make_controls(V, **controls)
    plain = draw(table, keys, c, length=64)
    np.testing.assert_array_equal(draw(table, keys, c, length=64, penalties=True), plain)
    assert (plain != END).any()
    if not controls.get("greedy"):
        assert (plain == END).any()


def test_penalties_follow_their_definitions():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (4, V)).astype(np.float32)
    counts = rng.integers(0, 3, (4, V)).astype(np.int32)
    c = sampler.make_controls(V, presence=[0.5, 0.0, 0.0, 1.0], frequency=[0.0, 0.25, 0.0, 1.0],
                              repetition=[1.0, 1.0, 1.3, 2.0])
    got = np.asarray(jax.jit(sampler.penalize)(logits, counts, c))
    seen = counts > 0
    rep = c.repetition[:, None]
    want = np.where(seen, np.where(logits > 0, logits / rep, logits * rep), logits)
    want = want - c.presence[:, None] * seen - c.frequency[:, None] * counts
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("penalty", [dict(frequency=2.0), dict(presence=3.0), dict(repetition=3.0)])
def test_a_penalty_breaks_a_greedy_loop(penalty):
    keys = prng.row_keys(0, 1)
    plain = draw(loop_table(), keys, sampler.make_controls(V, greedy=True), length=64, penalties=True)[0]
    steered = draw(loop_table(), keys, sampler.make_controls(V, greedy=True, **penalty), length=64,
                   penalties=True)[0]
    assert plain[:6].tolist() == [2, 3, 2, 3, 2, 3]
    assert longest_repeat(plain) == 62
    assert len(set(steered.tolist())) > 2  # it leaves the loop
    assert longest_repeat(steered[:16]) < longest_repeat(plain[:16])


def test_penalize_prime_counts_the_prime():
    prompt = sampler.prompt_tokens(np.array([3, 2], np.int32), 2)
    counts = sampler.prompt_counts(prompt, V)
    assert counts[0].tolist() == [0, 0, 1, 1, 0, 0, 0, 0]
    # Left-padded prompts count only after their last start token.
    padded = sampler.pad_prompts([np.array([3, 2, 2], np.int32), np.array([], np.int32)])
    assert sampler.prompt_counts(padded, V).tolist() == [[0, 0, 2, 1, 0, 0, 0, 0], [0] * V]
    # After "3 2": greedy says 3; with the prime counted, a huge presence penalty forbids 2 and 3.
    keys = prng.row_keys(0, 2)
    c = sampler.make_controls(V, greedy=True, presence=100.0)
    free = draw(loop_table(), keys, c, length=CHUNK, penalties=True, prompt=prompt)
    counted = draw(loop_table(), keys, c, length=CHUNK, penalties=True, prompt=prompt, counts=counts)
    assert free[0, 0] == 3 and counted[0, 0] not in (2, 3)


# --- prompts -----------------------------------------------------------------------------------


def counter_step(carry, token_B):
    """A per-row carry (a running sum of the tokens read) whose logits favour ``sum % 6 + 2``."""
    (sum_B,) = carry
    sum_B = sum_B + token_B
    logits = jnp.where(jnp.arange(V)[None, :] == (sum_B % 6 + 2)[:, None], 5.0, 0.0)
    return (sum_B,), logits


counter_step.row_carry = True  # the whole carry is per-row: prime resets it at start tokens


def test_pad_prompts_left_pads_to_a_power_of_two_and_primes_the_same_state():
    ids = [np.array([4, 5, 6], np.int32), np.array([2], np.int32), np.array([], np.int32)]
    p = sampler.pad_prompts(ids)
    assert p.shape == (3, 4) and p.dtype == np.int32
    assert p.tolist() == [[START, 4, 5, 6], [START, START, START, 2], [START] * 4]
    assert sampler.pad_prompts([np.arange(2, 9)]).shape == (1, 8)
    prime, _ = sampler.make_sampler(counter_step, chunk=16)
    garbage = np.array([[5, 6, 7, START, 4, 5, 6]], np.int32)  # anything before the start token
    a = prime((jnp.full((1,), 99, jnp.int32),), garbage, prng.row_keys(0, 1))
    b = prime((jnp.zeros((1,), jnp.int32),), p[:1], prng.row_keys(0, 1))
    np.testing.assert_array_equal(np.asarray(a.carry[0]), np.asarray(b.carry[0]))
    np.testing.assert_array_equal(np.asarray(a.logits_BxV), np.asarray(b.logits_BxV))


# --- stop strings ------------------------------------------------------------------------------


def feed_all(stops, pieces):
    m = sampler.StopMatcher(stops)
    out, stopped = [], False
    for p in pieces:
        text, stopped = m.feed(p)
        out.append(text)
        if stopped:
            break
    if not stopped:
        out.append(m.flush())
    return "".join(out), stopped, out


@pytest.mark.parametrize("pieces", [["hello world"], ["hel", "lo w", "orld"], list("hello world")])
def test_stop_matcher_cuts_before_the_first_stop_in_any_split(pieces):
    assert feed_all(["o w"], pieces)[:2] == ("hell", True)
    assert feed_all(["xyz"], pieces)[:2] == ("hello world", False)
    assert feed_all(["world", "lo"], pieces)[:2] == ("hel", True)  # the earliest of several
    assert feed_all([], pieces)[:2] == ("hello world", False)


def test_stop_matcher_holds_back_only_a_possible_start():
    m = sampler.StopMatcher(["abc"])
    assert m.feed("xxab") == ("xx", False)  # "ab" may begin "abc"
    assert m.feed("d") == ("abd", False)
    assert m.feed("ab") == ("", False)
    assert m.feed("c") == ("", True)
    assert m.feed("more") == ("", True)


# --- a row's text, chunk by chunk --------------------------------------------------------------

ROW_VOCAB = Vocab.from_texts(["abcdefgh xyz"])


def row_feed(chunks, length, stops=(), end_reason="end"):
    """Each chunk's ``RowText.feed`` answer, chunks given as text with "$" for the end token."""
    row = sampler.RowText(ROW_VOCAB.decode, length, stops, end_reason)
    ids = [np.array([END if c == "$" else int(ROW_VOCAB.encode(c)[0]) for c in chunk], np.int32) for chunk in chunks]
    return [row.feed(c) for c in ids], row


def test_row_text_ends_at_the_end_token_and_flushes_what_a_stop_held_back():
    got, row = row_feed(["abx", "y$zz", "ccc"], length=100, stops=["xyz"])
    assert got == [("ab", None), ("xy", "end"), ("", "end")]  # "x", "xy" held back, then flushed at the end
    assert row.finished and row.finish == "end"
    # the server reports the end token as OpenAI's "stop"
    assert row_feed(["ab$"], length=100, end_reason="stop")[0] == [("ab", "stop")]


def test_row_text_stops_before_a_stop_string_spanning_two_chunks():
    got, _ = row_feed(["abcx", "yzdef", "gh"], length=100, stops=["xyz"])
    assert got == [("abc", None), ("", "stop"), ("", "stop")]
    got, _ = row_feed(["ab x", "y", "d"], length=100, stops=["xyz"])
    assert got == [("ab ", None), ("", None), ("xyd", None)]  # "xy" was only a possible start


def test_row_text_counts_its_length_and_ignores_tokens_past_it():
    got, row = row_feed(["abc", "defgh", "xyz"], length=5)
    assert got == [("abc", None), ("de", "length"), ("", "length")]
    assert row.remaining == 0
    got, _ = row_feed(["abcx", "yd"], length=6, stops=["xyz"])
    assert got == [("abc", None), ("xyd", "length")]  # the held-back "x" is flushed at the length
    got, _ = row_feed(["abcd$"], length=4)
    assert got == [("abcd", "length")]  # an end token past the length is never read


# --- through a trained run -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def looping_run(tmp_path_factory):
    """A tiny LSTM trained on a repetitive text, so greedy decoding loops."""
    d = tmp_path_factory.mktemp("steer")
    corpus = d / "corpus.txt"
    corpus.write_text("abcabcabcabd " * 60, encoding="utf-8")
    config = RunConfig(model=ModelConfig(cell="lstm", layers=1, hidden=32),
                       train=TrainConfig(max_steps=60, batch_size=8, seq_len=32, lr=1e-2))
    result = charrnn.train(str(corpus), config, out=d / "run")
    return charrnn.load(result.run_dir)


def test_run_prime_resets_the_state_at_every_start_token(looping_run):
    """What the server's prompt buckets rely on: anything before the start token changes nothing."""
    prime, _, params = looping_run._sampler_fns()
    ids = looping_run.vocab.encode("abca")
    keys = prng.row_keys(0, 1)
    prompts = [sampler.prompt_tokens(ids, 1), sampler.pad_prompts([ids]),
               np.concatenate([looping_run.vocab.encode("bd c"), [START], ids]).astype(np.int32)[None]]
    assert [p.shape[1] for p in prompts] == [5, 8, 9]
    states = [prime((params, looping_run._zero_carry(1)), p, keys) for p in prompts]
    for s in states[1:]:
        np.testing.assert_array_equal(np.asarray(s.logits_BxV), np.asarray(states[0].logits_BxV))
        for a, b in zip(jax.tree_util.tree_leaves(s.carry.state), jax.tree_util.tree_leaves(states[0].carry.state)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_run_rows_do_not_depend_on_num_samples(looping_run):
    cfg = dict(length=150, temperature=1.5, seed=2 ** 40 + 3)
    many = looping_run.sample(num_samples=5, **cfg)
    one = looping_run.sample(num_samples=1, **cfg)
    assert one[0] == many[0]
    assert len({s.text for s in many}) > 1
    assert looping_run.sample(num_samples=1, length=150, temperature=1.5, seed=3)[0] != one[0]


def test_run_frequency_penalty_stops_the_greedy_loop(looping_run):
    plain = looping_run.sample(length=120, greedy=True)[0]
    steered = looping_run.sample(length=120, greedy=True, frequency_penalty=2.0)[0]
    zero = looping_run.sample(length=120, greedy=True, presence_penalty=0.0, repetition_penalty=1.0)[0]
    assert zero == plain
    assert longest_repeat([ord(c) for c in steered.text]) < longest_repeat([ord(c) for c in plain.text]) / 2


def test_run_stop_strings_end_every_sample_just_before_them(looping_run):
    base = dict(length=200, temperature=1.2, seed=17, num_samples=6, prime="ab")
    full = looping_run.sample(**base)
    stopped = looping_run.sample(**base, stop=("ca", "d "))
    streamed = ["" for _ in full]
    for pieces, _ in looping_run.stream(SampleConfig(**base, stop=("ca", "d "))):
        streamed = [s + p for s, p in zip(streamed, pieces)]
    assert streamed == [s.text for s in stopped]
    hits = 0
    for f, s in zip(full, stopped):
        gen = f.text[2:]
        cuts = [i for i in (gen.find("ca"), gen.find("d ")) if i >= 0]
        if cuts:
            hits += 1
            assert s.text == "ab" + gen[:min(cuts)] and s.finish == "stop" and s.ended
        else:
            assert s.text == f.text and s.finish == f.finish
    assert hits >= 4
    assert all(f.finish in ("end", "length") and f.ended == (f.finish == "end") for f in full)


def test_cli_sample_json_has_finish_and_penalty_options(looping_run):
    r = CliRunner().invoke(cli, ["sample", str(looping_run.run_dir), "--json", "-n", "2", "--seed", "5",
                                 "--length", "40", "--stop", "d", "--frequency-penalty", "0.5",
                                 "--penalize-prime", "--prime", "abc"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 2 and all(row["finish"] in ("end", "stop", "length") for row in rows)
    assert all("d" not in row["text"] for row in rows)


@pytest.mark.parametrize("args, fragment", [
    (["--seed", str(2 ** 64)], "--seed must be in [0, 2**64)"),
    (["--seed", "-1"], "--seed must be in [0, 2**64)"),
    (["--temperature", "inf"], "--temperature must be a finite number"),
    (["--temperature", "0"], "--temperature must be greater than 0"),
    (["--repetition-penalty", "0"], "--repetition-penalty must be greater than 0"),
    (["--presence-penalty", "nan"], "--presence-penalty must be a finite number"),
    (["--stop", ""], "--stop must be non-empty"),
])
def test_cli_refuses_bad_sampling_values_in_one_line(tmp_path, args, fragment):
    r = CliRunner().invoke(cli, ["sample", str(tmp_path / "no-run"), *args])
    assert r.exit_code != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("charrnn: error: ") and fragment in lines[0], r.stderr
    assert "Traceback" not in r.output


SPLIT_SCRIPT = r"""
import numpy as np, jax
from charrnn import parallel, prng
from charrnn import sample as sampler
from charrnn.config import ModelConfig
from charrnn.model import build_model, split_model
model = build_model(ModelConfig(cell="gru", layers=1, hidden=16), 9, 0)
graphdef, params = split_model(model)
prompt = sampler.prompt_tokens(np.array([3, 4, 3], np.int32), 4)
out = []
for penalties in (False, True):
    c = sampler.make_controls(9, temperature=[1.0, 1.5, 0.8, 1.2], frequency=[0, 0.5, 1.0, 0], rows=4)
    counts = sampler.prompt_counts(prompt, 9) if penalties else None  # --penalize-prime
    for mesh in (None, parallel.local_mesh(2)):
        prime, generate = sampler.make_sampler(sampler.model_step_fn(graphdef), chunk=32, mesh=mesh,
                                               penalties=penalties)
        s = prime((params, model.initial_carry(4)), prompt, prng.row_keys(7, 4), counts)
        s, t = generate(s, c)
        out.append(np.asarray(t))
    # row 2 alone, on one device
    prime, generate = sampler.make_sampler(sampler.model_step_fn(graphdef), chunk=32, penalties=penalties)
    s = prime((params, model.initial_carry(1)), prompt[2:3], prng.row_keys(7, 1, first=2),
              None if counts is None else counts[2:3])
    out.append(np.asarray(generate(s, sampler.take_rows(c, [2]))[1]))
for i in (0, 3):
    assert (out[i] == out[i + 1]).all(), (out[i], out[i + 1])
    assert (out[i][2] == out[i + 2][0]).all()
assert (out[0][2] != out[3][2]).any()  # the penalties did something
print("same")
"""


@pytest.mark.slow  # a subprocess with two CPU devices
def test_the_device_split_draws_what_one_device_draws():
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2")
    r = subprocess.run([sys.executable, "-c", SPLIT_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["same"]


# --- copy detection in `charrnn sample` ----------------------------------------------------------


def test_cli_show_copies_marks_the_longest_verbatim_span(looping_run):
    r = CliRunner().invoke(cli, ["sample", str(looping_run.run_dir), "--json", "-n", "3", "--seed", "2",
                                 "--length", "30", "--temperature", "2.0", "--show-copies"])
    assert r.exit_code == 0, r.output
    train = "abcabcabcabd " * 60
    for row in map(json.loads, r.stdout.splitlines()):
        text, c = row["text"], row["longest_copy"]
        assert text[c["start"]:c["start"] + c["length"]] in train
        longest = max((j - i for i in range(len(text)) for j in range(i + 1, len(text) + 1)
                       if text[i:j] in train), default=0)
        assert c["length"] == longest
    r = CliRunner().invoke(cli, ["sample", str(looping_run.run_dir), "-n", "2", "--seed", "2", "--length", "20",
                                 "--show-copies"])
    assert r.exit_code == 0 and r.stdout.count("longest copy from the training text") == 2, r.output


def test_cli_min_novel_redraws_then_says_so(looping_run):
    args = ["sample", str(looping_run.run_dir), "--json", "-n", "2", "--seed", "4", "--length", "30"]
    r = CliRunner().invoke(cli, args + ["--min-novel", "2"])  # every sample copies 2 characters
    assert r.exit_code == 0, r.output
    assert "still copy 2 or more characters from the training text after 10 re-draws" in r.stderr
    assert len(r.stdout.splitlines()) == 2
    r = CliRunner().invoke(cli, args + ["--min-novel", "1000"])
    assert r.exit_code == 0 and r.stderr == ""
    assert r.stdout == CliRunner().invoke(cli, args).stdout
    r = CliRunner().invoke(cli, args + ["--min-novel", "0"])
    assert r.exit_code != 0 and r.stderr.strip() == "charrnn: error: --min-novel must be at least 1, not 0"

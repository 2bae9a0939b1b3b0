"""Beam search, fine-tuning, samples while training, plots and novelty marks."""

from __future__ import annotations

import itertools
import json
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from click.testing import CliRunner

import charrnn
from charrnn import beam as beam_mod
from charrnn import sample as sampler
from charrnn.cli import cli
from charrnn.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from charrnn.model import build_model
from charrnn.vocab import END, START

TEXT = "abba abab baba " * 40


@pytest.fixture(scope="module")
def tiny_model():
    model = build_model(ModelConfig(cell="gru", layers=1, hidden=6), 5, 3)  # start, end, 'a', 'b', ' '

    def step_fn(carry, tok):
        return model.step(carry, tok)

    return model, step_fn


def _primed(model, step_fn, prompt):
    prime, _ = sampler.make_sampler(step_fn)
    state = prime(model.initial_carry(1), jnp.asarray([prompt], jnp.int32), jax.random.PRNGKey(0))
    return state.carry, state.logits_BxV


def _exhaustive(model, step_fn, prompt, length):
    """Every continuation of ``length`` tokens (end tokens only after an end), with its log-prob."""
    V = model.vocab_size
    out = {}
    for seq in itertools.product(range(1, V), repeat=length):
        if any(seq[i] == END and seq[i + 1] != END for i in range(length - 1)):
            continue
        carry, logits = _primed(model, step_fn, prompt)
        total = 0.0
        for tok in seq:
            logp = jax.nn.log_softmax(logits.at[:, START].set(-jnp.inf))[0]
            total += float(logp[tok])
            if tok == END:
                break  # an ended sequence continues with probability one
            carry, logits = step_fn(carry, jnp.asarray([tok], jnp.int32))
        out[seq] = total
    return out


def test_beam_search_equals_exhaustive_search(tiny_model):
    model, step_fn = tiny_model
    prompt, length = [START, 2], 3
    truth = _exhaustive(model, step_fn, prompt, length)
    beam = len(truth)  # wide enough to be exact
    result = jax.device_get(beam_mod.make_beam_search(step_fn, beam, length)(*_primed(model, step_fn, prompt)))
    order = beam_mod.rank_beams(result)
    got = [(tuple(int(t) for t in result.tokens_KxL[i]), float(result.logprob_K[i])) for i in order]
    want = sorted(truth.items(), key=lambda kv: -kv[1])
    assert [s for s, _ in got] == [s for s, _ in want]
    np.testing.assert_allclose([lp for _, lp in got], [lp for _, lp in want], rtol=1e-5, atol=1e-5)
    # a narrower beam may miss the best sequences, but scores the ones it keeps exactly
    narrow = jax.device_get(beam_mod.make_beam_search(step_fn, 3, length)(*_primed(model, step_fn, prompt)))
    for i in beam_mod.rank_beams(narrow):
        seq = tuple(int(t) for t in narrow.tokens_KxL[i])
        assert float(narrow.logprob_K[i]) == pytest.approx(truth[seq], abs=1e-5)


def test_beam_one_is_greedy_decoding(tiny_model):
    model, step_fn = tiny_model
    prompt, length = [START, 3, 2], 12
    result = jax.device_get(beam_mod.make_beam_search(step_fn, 1, length)(*_primed(model, step_fn, prompt)))
    prime, generate = sampler.make_sampler(step_fn, chunk=length)
    controls = sampler.make_controls(model.vocab_size, greedy=True)
    state = prime(model.initial_carry(1), jnp.asarray([prompt], jnp.int32), jax.random.PRNGKey(5))
    _, greedy = generate(state, controls)
    assert np.asarray(result.tokens_KxL[0]).tolist() == np.asarray(greedy[0]).tolist()


def test_length_penalty_reorders_by_mean_log_probability():
    beam = beam_mod.Beam(tokens_KxL=np.zeros((3, 4), np.int32), logprob_K=np.array([-4.0, -3.0, -np.inf]),
                        length_K=np.array([4, 1, 2]), ended_K=np.array([False, True, True]))
    assert beam_mod.rank_beams(beam, 0.0) == [1, 0]
    assert beam_mod.rank_beams(beam, 1.0) == [0, 1]  # -1.0 per char beats -3.0 per char


def _train(tmp_path, name, text, **kw):
    corpus = tmp_path / f"{name}.txt"
    corpus.write_text(text, encoding="utf-8")
    train = dict(batch_size=4, seq_len=16, eval_every=25, log_every=5, lr=1e-2)
    train.update(kw.pop("train", {}))
    config = RunConfig(model=ModelConfig(hidden=24, layers=1), train=TrainConfig(**train), **kw)
    return charrnn.train(str(corpus), config, out=tmp_path / name)


@pytest.mark.slow
def test_fine_tuning_keeps_ids_and_starts_where_the_old_run_ended(tmp_path):
    old_text = "the quick brown fox jumps over the lazy dog. " * 30 + "Q"  # 'Q': a rare character
    old = _train(tmp_path, "old", old_text, train={"max_steps": 300})
    new_text = "XYZ! " * 30 + old_text
    corpus = tmp_path / "new.txt"
    corpus.write_text(new_text, encoding="utf-8")
    # One step at a negligible learning rate: the saved weights are the transplanted ones.
    config = RunConfig(model=ModelConfig(hidden=24, layers=1),
                       train=TrainConfig(batch_size=4, seq_len=16, eval_every=25, max_steps=1, lr=1e-12))
    new = charrnn.train(str(corpus), config, out=tmp_path / "new", init_from=tmp_path / "old")
    old_vocab = charrnn.load(old.run_dir).vocab
    new_vocab = charrnn.load(new.run_dir).vocab
    assert new_vocab.chars[:len(old_vocab.chars)] == old_vocab.chars
    assert set(new_vocab.chars[len(old_vocab.chars):]) == set("XYZ!")
    first_eval = next(json.loads(l) for l in (tmp_path / "new" / "metrics.jsonl").read_text().splitlines()
                      if json.loads(l)["event"] == "eval")
    assert first_eval["step"] == 0
    before = charrnn.load(old.run_dir, "latest").evaluate(old_text)["nats"]
    after = charrnn.load(new.run_dir, "latest").evaluate(old_text)["nats"]
    assert before < 1.0  # the old run learned its text
    # Only the new characters' fresh output rows differ: a fresh model would be at ln(V) ~ 3.3.
    assert before <= after < before + 0.05


def test_samples_while_training_are_recorded_with_a_fixed_seed(tmp_path):
    runs = [_train(tmp_path, f"s{i}", TEXT, train={"max_steps": 20, "sample_every": 10, "sample_length": 30})
            for i in range(2)]
    samples = [[json.loads(l) for l in (r.run_dir / "metrics.jsonl").read_text().splitlines()
                if json.loads(l)["event"] == "sample"] for r in runs]
    assert [s["step"] for s in samples[0]] == [10, 20]
    assert all(0 < len(s["text"]) <= 30 or s["text"] == "" for s in samples[0])
    assert samples[0] == samples[1]  # same seed, same samples


def test_plot_renders_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    run = _train(tmp_path, "p", TEXT, train={"max_steps": 20, "eval_every": 10})
    out = tmp_path / "loss.png"
    r = CliRunner().invoke(cli, ["plot", str(run.run_dir), str(run.run_dir), "-o", str(out)])
    assert r.exit_code == 0, r.output
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1200, 450)
    assert len(data) > 10_000


def test_plot_of_a_missing_run_is_refused(tmp_path):
    r = CliRunner().invoke(cli, ["plot", str(tmp_path / "nope"), "-o", str(tmp_path / "x.png")])
    assert r.exit_code == 1 and r.stderr.startswith("charrnn: error: ")


def test_mark_novel_for_line_corpora(tmp_path):
    names = ["anna", "bob", "cora", "dave", "emma", "finn", "gus", "hana"] * 30
    run = _train(tmp_path, "names", "\n".join(names) + "\n", data=DataConfig(docs="line"),
                 train={"max_steps": 200})
    r = CliRunner().invoke(cli, ["sample", str(run.run_dir), "--mark-novel", "--json", "-n", "16", "--seed", "1",
                                 "--length", "20"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(l) for l in r.stdout.splitlines()]
    assert len(rows) == 16
    assert all(row["novel"] == (row["text"] not in set(names)) for row in rows)
    assert any(not row["novel"] for row in rows)  # a memorised name is recognised


def test_a_loaded_run_compiles_only_the_sampler_before_its_first_sample(tmp_path):
    # Time to the first character: each eager jnp conversion of a parameter, a control, the
    # carry or the seed compiles a small XLA program of its own (~10 ms apiece, a dozen of
    # them). Loading and sampling compile the sampler's prime and generate programs only.
    result = _train(tmp_path, "run", TEXT, train=dict(max_steps=2))
    compiled = []

    def listen(name, secs, **kw):
        if name == "/jax/core/compile/jaxpr_to_mlir_module_duration":  # one per program lowered
            compiled.append(name)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        run = charrnn.load(result.run_dir)
        run.sample(length=5, seed=3, temperature=0.9, top_k=2)
        assert len(compiled) == 2
        run.beam_search("ab", beam=2, length=3)
        assert len(compiled) == 4  # the beam search's own program, and priming at batch 1
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)

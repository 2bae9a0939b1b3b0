"""The jitted train step, learning-rate schedules, and ``charrnn.train`` end to end.

Shapes are shared with ``test_model.py`` (vocabulary 13 = 11 characters + start/end, two LSTM
layers of 16) so eager initialisation compiles once per session; every corpus below has
exactly 11 distinct characters.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import math
import os
import resource
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import charrnn
from charrnn import checkpoint as ckpt
from charrnn import runtime
from charrnn import data
from charrnn import runs
from charrnn.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from charrnn.errors import CharrnnError
from charrnn.evaluate import evaluate_stream, weighted_nll
from charrnn.model import build_model
from charrnn.checkpoint import load_train_state, save_train_state
from charrnn.train_step import TrainState, init_state, lr_schedule, make_optimizer, make_train_step
from charrnn.train import total_steps
from charrnn.vocab import START, Vocab

V, H, B, T = 13, 16, 3, 10
MODEL = ModelConfig(cell="lstm", layers=2, hidden=H)
# 63 characters, 11 distinct; three characters of context always determine the next one.
MEMO_TEXT = "north sea cats ate a hot tartan. hens ran to the recent shores."
SHORT_TEXT = "north sea cats ate hot tartans."
NAMES = ["emma", "emma", "emma", "liam", "noah", "mia", "theo", "sara", "rhea", "ian", "tom", "nils"]
VOLATILE = ("elapsed_s", "chars_per_s")  # wall-clock fields of metrics.jsonl records
# `charrnn.train` is the function (exported by the package), which hides the module of that name.
train_mod = sys.modules["charrnn.train"]
train_step_mod = sys.modules["charrnn.train_step"]


def host(tree):
    """A numpy copy (the train step donates its inputs)."""
    return jax.tree_util.tree_map(lambda a: np.array(a), tree)


def device(tree):
    return jax.tree_util.tree_map(jnp.array, tree)


def assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def stepper():
    """One jitted train step shared by the step tests (it is pure), counting its traces."""
    cfg = TrainConfig(batch_size=B, seq_len=T, lr=1e-2)
    model = build_model(MODEL, V, 0)
    opt = make_optimizer(cfg, lr_schedule(cfg, 100))
    graphdef, state = init_state(model, opt, cfg.seed)
    traces = []

    def counting_nll(*args):
        traces.append(1)
        return weighted_nll(*args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_step_mod, "weighted_nll", counting_nll)
        step_fn = make_train_step(graphdef, opt, cfg)
        yield {"model": model, "opt": opt, "graphdef": graphdef, "state": host(state), "cfg": cfg,
               "step": step_fn, "traces": traces}


def fresh_state(stepper):
    return TrainState(*device(tuple(stepper["state"])))


def batch(seed=0, reset=False):
    rng = np.random.default_rng(seed)
    x = rng.integers(2, V, (B, T)).astype(np.int32)
    x[0, 3] = START
    y = np.concatenate([x[:, 1:], rng.integers(1, V, (B, 1)).astype(np.int32)], axis=1)
    return x, y, np.bool_(reset)


def reference_loss(params, carry, x, y):
    """Mean cross-entropy over the non-start targets, from the numpy reference of test_model."""
    from test_model import reference_forward

    _, logits = reference_forward("lstm", params, carry, x)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = logz - np.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
    scored = y != START
    return nll[scored].mean()


# --- memory ------------------------------------------------------------------------------------

# Compiles and runs one train step in a fresh process, with or without the memory-saving
# schedule (it must be chosen before JAX starts its backends, so not in this process).
_SCHEDULE_PROBE = """
import sys
import numpy as np
import charrnn
from charrnn.config import ModelConfig, TrainConfig
from charrnn.model import build_model
import charrnn.train
from charrnn import runtime
train = sys.modules["charrnn.train"]
took = runtime.use_memory_saving_schedule() if sys.argv[1] == "1" else False
cfg = TrainConfig(batch_size=3, seq_len=10)
model = build_model(ModelConfig(cell="lstm", layers=2, hidden=16), 13, 0)
opt = train.make_optimizer(cfg, train.lr_schedule(cfg, None))
graphdef, state = train.init_state(model, opt, 0)
x = np.random.default_rng(0).integers(2, 13, (3, 11)).astype(np.int32)
batch = (x[:, :-1], x[:, 1:], np.bool_(False))
compiled = train.make_train_step(graphdef, opt, cfg).lower(state, model.initial_carry(3), batch).compile()
_, _, m = compiled(state, model.initial_carry(3), batch)
print(took, compiled.memory_analysis().temp_size_in_bytes, float(m["loss"]).hex())
"""


@pytest.mark.slow
def test_memory_saving_schedule_shrinks_the_step_and_keeps_its_numbers():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["CHARRNN_LSTM_KERNEL"] = "0"  # the schedule of XLA's own scan (the native layer has none)
    env["JAX_PLATFORMS"] = "cpu"  # only XLA:CPU has this scheduler
    out = {}
    for flag in ("0", "1"):
        r = subprocess.run([sys.executable, "-c", _SCHEDULE_PROBE, flag], capture_output=True, text=True,
                           timeout=300, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        took, temp, loss = r.stdout.split()
        out[flag] = (took, int(temp), loss)
    assert out["0"][0] == "False" and out["1"][0] == "True"
    assert out["1"][1] < 0.9 * out["0"][1]  # measured: 69 KB of temporaries instead of 88
    assert out["1"][2] == out["0"][2]  # the same operations in another order: the same bits


def test_memory_saving_schedule_is_a_no_op_once_jax_runs(monkeypatch):
    jnp.zeros(1).block_until_ready()
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_thunk_runtime=true")
    assert runtime.use_memory_saving_schedule() is False
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_use_thunk_runtime=true"


@pytest.mark.slow
def test_deterministic_gpu_ops_are_asked_for_before_jax_runs_and_never_after(monkeypatch):
    probe = ("import os; from charrnn.runtime import use_deterministic_gpu_ops as f; "
             "print(f(), f(), os.environ['XLA_FLAGS'])")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["True", "False", "--xla_gpu_deterministic_ops=true"]  # added once
    jnp.zeros(1).block_until_ready()
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_thunk_runtime=true")
    assert runtime.use_deterministic_gpu_ops() is False  # XLA has read its flags: too late
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_use_thunk_runtime=true"


def test_compiling_returns_the_freed_heap(monkeypatch):
    runtime.keep_freed_memory()
    if runtime.release_freed_memory.trim is None:
        pytest.skip("not glibc: nothing to trim")
    calls = []
    monkeypatch.setattr(runtime.release_freed_memory, "trim", calls.append)
    x = np.zeros(7, np.float32)
    assert calls == []
    jax.jit(lambda a: a * 3.0 + 1.0).lower(x).compile()  # a fresh compilation
    assert calls and set(calls) == {0}


def test_blocks_above_the_mmap_threshold_are_reused_without_page_faults():
    # A step's temporaries can be one block per device larger than glibc's largest mmap
    # threshold (32 MiB); mapped afresh each step, every one of its pages faults again.
    runtime.keep_freed_memory()
    if runtime.release_freed_memory.trim is None:
        pytest.skip("not glibc")
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 48 << 20

    def touched_block():
        p = libc.malloc(size)
        assert p
        ctypes.memset(p, 1, size)
        return p

    libc.free(touched_block())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = touched_block()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    libc.free(p)
    assert faults < (size // 4096) // 20, faults  # a fresh mapping faults on each of 12k pages


# --- the train step ----------------------------------------------------------------------------


def test_one_step_changes_every_parameter_and_reports_the_loss(stepper):
    state = fresh_state(stepper)
    x, y, reset = batch()
    carry = stepper["model"].initial_carry(B)
    before, carry0 = host(state.params), host(carry)
    new_state, new_carry, metrics = stepper["step"](state, carry, (x, y, reset))
    assert bool(metrics["ok"])
    assert float(metrics["loss"]) == pytest.approx(reference_loss(before, carry0, x, y), rel=1e-5)
    assert float(metrics["grad_norm"]) > 0
    assert int(new_state.step) == 1
    after = host(new_state.params)
    flat_before = jax.tree_util.tree_flatten_with_path(before)[0]
    flat_after = jax.tree_util.tree_leaves(after)
    assert len(flat_before) == len(flat_after) == 2 * 3 + 2
    for (path, b), a in zip(flat_before, flat_after):
        assert not np.array_equal(a, b), f"{jax.tree_util.keystr(path)} did not change"
    # The first layer reads one-hot input: rows of ids absent from the batch get no gradient
    # and (Adam, no weight decay) stay exactly as they were; the others all move.
    w0, w1 = before["cells"][0]["w_ih"], after["cells"][0]["w_ih"]
    present = set(np.unique(x).tolist())
    moved = {tok for tok in range(V) if not np.array_equal(w0[tok], w1[tok])}
    assert moved == present and len(present) < V
    assert all(a.shape == (B, H) for a in jax.tree_util.tree_leaves(new_carry))


def test_step_compiles_once(stepper):
    step_fn = stepper["step"]
    state, carry = fresh_state(stepper), stepper["model"].initial_carry(B)
    losses = []
    for i in range(5):
        state, carry, metrics = step_fn(state, carry, batch(seed=i, reset=(i % 2 == 0)))
        losses.append(float(metrics["loss"]))
    # One trace and one executable for every call in this module (all share the step).
    assert len(stepper["traces"]) == 1
    if hasattr(step_fn, "_cache_size"):
        assert step_fn._cache_size() == 1
    assert int(state.step) == 5 and all(math.isfinite(v) for v in losses)
    assert losses[-1] != losses[0]


def test_reset_zeroes_the_carried_state(stepper):
    step_fn, model = stepper["step"], stepper["model"]
    rng = np.random.default_rng(3)
    carry = host(jax.tree_util.tree_map(lambda a: rng.uniform(-0.5, 0.5, a.shape).astype(np.float32),
                                        model.initial_carry(B)))
    x, y, _ = batch()
    _, c_reset, m_reset = step_fn(fresh_state(stepper), device(carry), (x, y, np.bool_(True)))
    _, c_zero, m_zero = step_fn(fresh_state(stepper), model.initial_carry(B), (x, y, np.bool_(False)))
    _, _, m_kept = step_fn(fresh_state(stepper), device(carry), (x, y, np.bool_(False)))
    assert float(m_reset["loss"]) == float(m_zero["loss"])
    assert_trees_equal(c_reset, c_zero)
    assert float(m_kept["loss"]) != float(m_reset["loss"])
    params = stepper["state"].params
    assert float(m_kept["loss"]) == pytest.approx(reference_loss(params, carry, x, y), rel=1e-5)


def test_non_finite_parameters_skip_the_step(stepper):
    state = fresh_state(stepper)
    params = dict(state.params)
    params["b_out"] = params["b_out"].at[3].set(jnp.inf)
    state = state._replace(params=params)
    before_params, before_opt = host(state.params), host(state.opt_state)
    new_state, new_carry, metrics = stepper["step"](state, stepper["model"].initial_carry(B), batch())
    assert not bool(metrics["ok"])
    assert not math.isfinite(float(metrics["loss"]))
    assert_trees_equal(host(new_state.params), before_params)  # inf stays inf, nothing moved
    assert_trees_equal(host(new_state.opt_state), before_opt)
    assert int(new_state.step) == 1  # the batch was consumed


def test_non_finite_carry_skips_the_step_and_resets_the_carry(stepper):
    step_fn = stepper["step"]
    state = fresh_state(stepper)
    carry = jax.tree_util.tree_map(lambda a: jnp.full(a.shape, jnp.nan, jnp.float32),
                                   stepper["model"].initial_carry(B))
    before = host(state.params)
    state, carry, metrics = step_fn(state, carry, batch(reset=False))
    assert not bool(metrics["ok"])
    assert_trees_equal(host(state.params), before)
    for leaf in jax.tree_util.tree_leaves(carry):
        assert not np.asarray(leaf).any()  # zeroed, so the next step can succeed
    state, carry, metrics = step_fn(state, carry, batch(seed=1))
    assert bool(metrics["ok"]) and int(state.step) == 2
    assert not np.array_equal(host(state.params)["w_out"], before["w_out"])


def test_save_and_load_train_state_round_trip(stepper, tmp_path):
    from flax import nnx

    step_fn, model, graphdef = stepper["step"], stepper["model"], stepper["graphdef"]
    state, carry = fresh_state(stepper), model.initial_carry(B)
    for i in range(3):
        state, carry, _ = step_fn(state, carry, batch(seed=i))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    path = save_train_state(run_dir, state, carry, {"step": 3, "note": "x"})
    ckpt.set_pointer(run_dir, "latest", path.name)
    template = fresh_state(stepper)
    loaded, loaded_carry, meta = load_train_state(run_dir, template, model.initial_carry(B))
    assert meta == {"step": 3, "note": "x"}
    assert_trees_equal(host(loaded), host(state))
    assert_trees_equal(host(loaded_carry), host(carry))
    # charrnn.load on the same directory gives bit-identical logits.
    vocab = Vocab(tuple("abcdefghijk"))
    assert vocab.size == V
    runs.write_run_files(run_dir, RunConfig(model=MODEL), vocab)
    run = charrnn.load(run_dir)
    x = jnp.asarray(batch()[0])
    forward = jax.jit(lambda g, p, c, t: nnx.merge(g, p)(c, t)[1], static_argnums=0)
    expected = forward(graphdef, state.params, model.initial_carry(B), x)
    got = forward(run.graphdef, run.params, model.initial_carry(B), x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    assert run.step == 3 and run.num_params == sum(a.size for a in jax.tree_util.tree_leaves(host(state.params)))
    # A step count that disagrees with the saved state is refused.
    path = save_train_state(run_dir, state, carry, {"step": 4})
    ckpt.set_pointer(run_dir, "latest", path.name)
    with pytest.raises(ckpt.CheckpointError, match="'step'"):
        load_train_state(run_dir, template, model.initial_carry(B))


# --- optimizer and schedules ---------------------------------------------------------------------


def test_lr_schedules_exact_values():
    def values(total, steps, **kw):
        f = lr_schedule(TrainConfig(lr=0.5, **kw), total)
        return [float(f(s)) for s in steps]

    assert values(None, [0, 7, 10 ** 6]) == [0.5, 0.5, 0.5]
    # Linear warm-up from lr/warmup to lr, reached at step `warmup`.
    assert values(None, [0, 2, 4, 100], warmup_steps=4) == pytest.approx([0.125, 0.3125, 0.5, 0.5], rel=1e-6)
    # Cosine over the 100 steps after warm-up, ending at lr * 0.1.
    assert values(104, [4, 54, 104, 500], warmup_steps=4, lr_schedule="cosine") == pytest.approx(
        [0.5, 0.5 * (0.1 + 0.9 * 0.5), 0.05, 0.05], rel=1e-6)
    assert values(100, [0, 25, 100], lr_schedule="cosine") == pytest.approx(
        [0.5, 0.5 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))), 0.05], rel=1e-6)
    # Exponential: times 0.1 over the same span.
    assert values(104, [4, 54, 104], warmup_steps=4, lr_schedule="exponential") == pytest.approx(
        [0.5, 0.5 * 0.1 ** 0.5, 0.05], rel=1e-6)
    with pytest.raises(CharrnnError, match="needs a known length"):
        lr_schedule(TrainConfig(lr_schedule="cosine"), None)


def test_optimizer_clips_then_updates():
    grads = {"w": jnp.asarray([3.0, 4.0], jnp.float32)}  # global norm 5
    params = {"w": jnp.zeros(2, jnp.float32)}
    for clip, want in ((1.0, [-0.06, -0.08]), (0.0, [-0.3, -0.4]), (10.0, [-0.3, -0.4])):
        opt = make_optimizer(TrainConfig(optimizer="sgd", grad_clip=clip), 0.1)
        updates, _ = opt.update(grads, opt.init(params), params)
        np.testing.assert_allclose(updates["w"], want, rtol=1e-6)
    # Adam's first step moves every coordinate by lr, whatever the gradient's size.
    opt = make_optimizer(TrainConfig(optimizer="adam", grad_clip=1.0), 0.1)
    updates, _ = opt.update(grads, opt.init(params), params)
    np.testing.assert_allclose(updates["w"], [-0.1, -0.1], rtol=1e-5)
    for name in ("adamw", "rmsprop"):
        opt = make_optimizer(TrainConfig(optimizer=name, weight_decay=0.1), 0.1)
        updates, _ = opt.update(grads, opt.init(params), params)
        assert (np.asarray(updates["w"]) < 0).all()


def test_total_steps():
    assert total_steps(TrainConfig(max_steps=7), 3) == 7
    assert total_steps(TrainConfig(epochs=2.5), 3) == 8  # round(7.5)
    assert total_steps(TrainConfig(epochs=0.01), 3) == 1
    assert total_steps(TrainConfig(max_steps=7, epochs=1), 3) == 3
    assert total_steps(TrainConfig(), 3) == 30  # default 10 epochs
    assert total_steps(TrainConfig(minutes=1.0), 3) is None


# --- charrnn.train end to end ------------------------------------------------------------------------
# All these runs share one model and batch layout, so with the session's
# persistent compilation cache their train steps (and evaluations) compile once.

E2E_MODEL = ModelConfig(cell="lstm", layers=2, hidden=H, dropout=0.1)


def run_config(data=None, model=E2E_MODEL, **train):
    base = dict(batch_size=2, seq_len=8, lr=2e-2, log_every=5, eval_every=5)
    base.update(train)
    return RunConfig(model=model, data=data or DataConfig(), train=TrainConfig(**base))


def records(run_dir, event=None):
    out = []
    for r in runs.read_metrics(run_dir):
        if event is None or r["event"] == event:
            out.append({k: v for k, v in r.items() if k not in VOLATILE})
    return out


def latest_checkpoint(run_dir):
    return ckpt.read_checkpoint(ckpt.resolve(run_dir, "latest"))


def test_memorizes_a_tiny_corpus(tmp_path):
    # Two files, one document each: the two streams of the batch each start at a document.
    assert len(SHORT_TEXT) == 31 and len(set(SHORT_TEXT)) == 11
    corpus = tmp_path / "docs"
    corpus.mkdir()
    for name in ("a.txt", "b.txt"):
        (corpus / name).write_text(SHORT_TEXT, encoding="utf-8")
    cfg = run_config(DataConfig(val_frac=0.0), max_steps=300, log_every=50)
    events = []
    result = charrnn.train(str(corpus), cfg, out=tmp_path / "run", on_event=events.append)
    assert (result.step, result.stop_reason) == (300, "steps")
    assert result.best_val is None and result.train_loss < 0.3
    start = events[0]
    assert start["event"] == "start" and start["steps_per_epoch"] == 4 and start["vocab_size"] == V
    assert start["train_chars"] == 66 and start["val_chars"] == 0
    assert events[-1] == {"event": "end", "step": 300, "reason": "steps", "best_val": None}
    assert [r["step"] for r in records(tmp_path / "run", "train")] == [50, 100, 150, 200, 250, 300]
    run = charrnn.load(tmp_path / "run")
    assert run.vocab.size == V and run.step == 300
    [sample] = run.sample(greedy=True, length=100, seed=0)
    assert sample == charrnn.Sample(SHORT_TEXT, True, "end")
    # The prime is part of the text, and the model continues it.
    [primed] = run.sample(greedy=True, length=100, prime="north sea", seed=0)
    assert primed == charrnn.Sample(SHORT_TEXT, True, "end")
    [short] = run.sample(greedy=True, length=5, seed=0)
    assert short == charrnn.Sample(SHORT_TEXT[:5], False, "length")
    # Its loss on the text is low (31 characters and the end token are scored), reversed high.
    ev = run.evaluate(SHORT_TEXT)
    assert ev["chars"] == 32 and ev["nats"] < 0.3 and ev["perplexity"] == pytest.approx(math.exp(ev["nats"]))
    assert run.evaluate(SHORT_TEXT[::-1])["nats"] > 1.5
    # Evaluation rows first read the characters before them, so the row count does not move the
    # loss: here every row reaches back to the stream's start, as one row does.
    stream = data.encode_documents([SHORT_TEXT], run.vocab)

    def loss(rows, warmup):
        return evaluate_stream(run.graphdef, run.params, run.model.initial_carry, stream, num_streams=rows,
                               seq_len=4, warmup=warmup)["nats"]

    assert loss(4, 100) == pytest.approx(loss(1, 0), rel=1e-5)
    assert loss(4, 0) > loss(1, 0) + 0.1, (loss(4, 0), loss(1, 0))  # rows started cold mid-text
    with pytest.raises(CharrnnError, match="'z'"):
        run.sample(prime="zebra")


def test_line_documents_end_at_the_end_token(tmp_path):
    assert len(set("".join(NAMES))) == 11
    corpus = tmp_path / "names.txt"
    corpus.write_text("\r\n".join(NAMES * 3) + "\r\n", encoding="utf-8")  # CRLF: \r is not a character
    cfg = run_config(DataConfig(docs="line", val_frac=0.0), max_steps=300, log_every=50)
    charrnn.train(str(corpus), cfg, out=tmp_path / "run")
    run = charrnn.load(tmp_path / "run")
    assert "\r" not in run.vocab.chars and "\n" not in run.vocab.chars
    greedy = run.sample(greedy=True, length=30, num_samples=8, seed=0)
    assert greedy == [charrnn.Sample("emma", True, "end")] * 8  # the most frequent name
    samples = run.sample(length=30, num_samples=8, temperature=0.7, seed=0)
    assert all(s.ended and 0 < len(s.text) < 30 for s in samples)
    assert sum(s.text in NAMES for s in samples) >= 5


N = 10  # resume tests: the first leg's steps; evaluation, logs and checkpoints every 5


@pytest.fixture(scope="module")
def resume_runs(tmp_path_factory):
    """Run A trains 2N steps in one go; run B trains N steps, then resumes to 2N."""
    root = tmp_path_factory.mktemp("resume")
    corpus = root / "corpus.txt"
    corpus.write_text(MEMO_TEXT * 3, encoding="utf-8")
    full = run_config(DataConfig(val_frac=0.2), max_steps=2 * N, keep=2)
    half = run_config(DataConfig(val_frac=0.2), max_steps=N, keep=2)
    a = charrnn.train(str(corpus), full, out=root / "A")
    b1 = charrnn.train(str(corpus), half, out=root / "B")
    first_leg = records(root / "B")
    b2 = charrnn.train(str(corpus), full, out=root / "B", resume=True)
    return {"root": root, "corpus": corpus, "full": full, "a": a, "b1": b1, "b2": b2, "first_leg": first_leg}


def test_same_seed_gives_identical_metrics(resume_runs):
    a_records = records(resume_runs["root"] / "A")
    first_leg = resume_runs["first_leg"]
    assert [(r["event"], r["step"]) for r in first_leg] == [("train", 5), ("eval", 5), ("train", 10), ("eval", 10)]
    assert first_leg == [r for r in a_records if r["step"] <= N]
    assert resume_runs["b1"].best_val == min(r["val_loss"] for r in first_leg if r["event"] == "eval")
    # The learning rate logged is the schedule's; chars count every step's batch.
    assert all(r["lr"] == 2e-2 and r["chars"] == r["step"] * 16 for r in a_records if r["event"] == "train")


def test_resumed_run_equals_uninterrupted_run(resume_runs):
    root, a, b2 = resume_runs["root"], resume_runs["a"], resume_runs["b2"]
    assert (a.step, a.stop_reason) == (b2.step, b2.stop_reason) == (2 * N, "steps")
    assert a.best_val == b2.best_val and a.train_loss == b2.train_loss and a.last_val == b2.last_val
    ta, ma = latest_checkpoint(root / "A")
    tb, mb = latest_checkpoint(root / "B")
    assert sorted(ta) == sorted(tb)
    assert {n.split("/")[0] for n in ta} == {"params", "opt", "carry", "step", "rng"}
    for name in ta:
        assert ta[name].dtype == tb[name].dtype
        np.testing.assert_array_equal(ta[name], tb[name], err_msg=name)
    assert ma == mb
    assert ma["step"] == 2 * N and ma["chars_seen"] == 2 * N * 2 * 8
    assert records(root / "A") == records(root / "B")
    assert [r["step"] for r in records(root / "A", "eval")] == [5, 10, 15, 20]
    assert [r["step"] for r in records(root / "A", "train")] == [5, 10, 15, 20]
    # keep=2 leaves the two newest checkpoints, plus the best one wherever it is.
    names = {p.name for p in ckpt.list_checkpoints(root / "B")}
    best = ckpt.read_pointer(root / "B", "best")
    assert names == {"ckpt-00000015", "ckpt-00000020", best}
    assert names == {p.name for p in ckpt.list_checkpoints(root / "A")}
    assert json.loads((root / "B" / "config.json").read_text())["train"]["max_steps"] == 2 * N
    assert not [p for p in (root / "B").iterdir() if p.name.startswith(ckpt.TMP_PREFIX)]


def test_resume_refuses_a_different_model(resume_runs):
    root, corpus, full = resume_runs["root"], resume_runs["corpus"], resume_runs["full"]
    other = RunConfig(model=ModelConfig(cell="gru", layers=2, hidden=32, dropout=0.1), data=full.data,
                      train=full.train)
    with pytest.raises(CharrnnError) as e:
        charrnn.train(str(corpus), other, out=root / "A", resume=True)
    msg = str(e.value)
    assert "model.hidden: run has 16, asked for 32" in msg and "model.cell: run has 'lstm', asked for 'gru'" in msg
    assert "model.layers" not in msg and "model.dropout" not in msg
    other = RunConfig(model=full.model, data=DataConfig(docs="line", val_frac=0.2),
                      train=dataclasses.replace(full.train, seq_len=4))
    with pytest.raises(CharrnnError) as e:
        charrnn.train(str(corpus), other, out=root / "A", resume=True)
    assert "data.docs: run has 'file', asked for 'line'" in str(e.value)
    assert "train.seq_len: run has 8, asked for 4" in str(e.value)


def test_resume_refuses_characters_outside_the_vocabulary(resume_runs, tmp_path):
    corpus = tmp_path / "other.txt"
    corpus.write_text(MEMO_TEXT + " xyz!", encoding="utf-8")
    with pytest.raises(CharrnnError) as e:
        charrnn.train(str(corpus), resume_runs["full"], out=resume_runs["root"] / "A", resume=True)
    msg = str(e.value)
    assert "4 character(s) missing" in msg
    assert "'x' (U+0078)" in msg and "'!' (U+0021)" in msg and "'a'" not in msg


def test_existing_run_is_not_overwritten(resume_runs):
    root = resume_runs["root"]
    before = sorted(p.name for p in (root / "A").iterdir())
    with pytest.raises(CharrnnError, match="already holds a run: pass --resume"):
        charrnn.train(str(resume_runs["corpus"]), resume_runs["full"], out=root / "A")
    assert sorted(p.name for p in (root / "A").iterdir()) == before


def test_overwrite_replaces_a_run(resume_runs, tmp_path):
    copy = tmp_path / "A"
    shutil.copytree(resume_runs["root"] / "A", copy)
    (copy / "notes.txt").write_text("mine", encoding="utf-8")
    short = dataclasses.replace(resume_runs["full"], train=dataclasses.replace(resume_runs["full"].train,
                                                                                max_steps=5))
    result = charrnn.train(str(resume_runs["corpus"]), short, out=copy, overwrite=True)
    assert (result.step, result.stop_reason) == (5, "steps")
    assert [p.name for p in ckpt.list_checkpoints(copy)] == ["ckpt-00000005"]
    assert [r["step"] for r in records(copy)] == [5, 5]  # the old run's records are gone
    assert records(copy) == records(resume_runs["root"] / "A")[:2]  # and the new ones are the same run's
    assert (copy / "notes.txt").read_text(encoding="utf-8") == "mine"  # other files are left alone


def test_resume_without_a_run_is_refused(tmp_path, tiny_corpus):
    with pytest.raises(ckpt.CheckpointError, match="no such run directory"):
        charrnn.train(str(tiny_corpus), None, out=tmp_path / "nothing", resume=True)
    with pytest.raises(CharrnnError, match="needs --out"):
        charrnn.train(str(tiny_corpus), None, resume=True)


def test_resume_with_the_saved_config(resume_runs, tmp_path):
    """``config=None`` resumes with the run's own settings: already finished, it stops at once."""
    copy = tmp_path / "A"
    shutil.copytree(resume_runs["root"] / "A", copy)
    before = records(copy)
    result = charrnn.train(str(resume_runs["corpus"]), None, out=copy, resume=True)
    assert (result.step, result.stop_reason) == (2 * N, "steps")
    assert records(copy) == before


def test_patience_stops_early(tmp_path):
    # Training text cycles a..k forwards; the validation tail runs backwards. Once the model
    # has learnt the forward order, validation gets worse at every evaluation.
    fwd = "abcdefghijk"
    corpus = tmp_path / "c.txt"
    corpus.write_text(fwd * 16 + fwd[::-1] * 4, encoding="utf-8")
    cfg = run_config(DataConfig(val_frac=0.2), max_steps=200, eval_every=2, patience=2)
    result = charrnn.train(str(corpus), cfg, out=tmp_path / "run")
    assert result.stop_reason == "patience" and result.step < 200
    evals = records(tmp_path / "run", "eval")
    flags = [r["best"] for r in evals]
    assert [r["step"] for r in evals] == list(range(2, result.step + 1, 2))
    # Stopped at the second evaluation in a row without a new best, and not before.
    assert flags[-2:] == [False, False] and flags[-3] is True
    assert not any(a is False and b is False for a, b in zip(flags[:-2], flags[1:-1]))
    losses = [r["val_loss"] for r in evals]
    assert result.best_val == min(losses) == losses[-3]
    assert result.last_val["nats"] == losses[-1]
    assert ckpt.read_pointer(tmp_path / "run", "best") == ckpt.checkpoint_name(evals[-3]["step"])
    assert ckpt.read_pointer(tmp_path / "run", "latest") == ckpt.checkpoint_name(result.step)


def test_minutes_budget_stops_training(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(MEMO_TEXT * 3, encoding="utf-8")
    cfg = run_config(DataConfig(val_frac=0.2), minutes=0.0005, max_steps=100_000)
    result = charrnn.train(str(corpus), cfg, out=tmp_path / "run")
    assert result.stop_reason == "minutes"
    assert 0 <= result.step < 100_000
    _, meta = latest_checkpoint(tmp_path / "run")
    assert meta["step"] == result.step  # the last step is saved...
    assert records(tmp_path / "run", "eval")[-1]["step"] == result.step  # ...and evaluated


def test_should_stop_interrupts_with_a_checkpoint(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(MEMO_TEXT * 3, encoding="utf-8")
    calls = []

    def should_stop():
        calls.append(1)
        return "SIGTERM" if len(calls) == 4 else None  # polled before steps 0, 1, 2, 3

    cfg = run_config(DataConfig(val_frac=0.2), max_steps=50)
    result = charrnn.train(str(corpus), cfg, out=tmp_path / "run", should_stop=should_stop)
    assert (result.step, result.stop_reason) == (3, "SIGTERM")
    _, meta = latest_checkpoint(tmp_path / "run")
    assert meta["step"] == 3 and meta["window"] == 3
    assert records(tmp_path / "run", "eval") == []  # an interrupt does not evaluate


def test_empty_and_too_small_corpora_are_refused(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(CharrnnError, match="empty: it has no non-empty lines"):
        charrnn.train(str(empty), run_config(DataConfig(docs="line")), out=tmp_path / "a")
    small = tmp_path / "small.txt"
    small.write_text("abc", encoding="utf-8")
    with pytest.raises(CharrnnError, match="too small: 5 tokens"):
        charrnn.train(str(small), run_config(DataConfig(val_frac=0.0)), out=tmp_path / "b")
    assert not (tmp_path / "b").exists()

"""Nothing lost: SIGKILL at random moments and inside saves, full disks, and non-finite steps."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import charrnn
from charrnn import checkpoint as ckpt
from charrnn.config import ModelConfig, RunConfig, TrainConfig
from charrnn.errors import CharrnnError

TEXT = "to be or not to be, that is the question. whether tis nobler in the mind to suffer\n" * 8
MAX_STEPS = 1000
ARGS = ["--hidden", "16", "--layers", "2", "--batch-size", "4", "--seq-len", "8", "--max-steps", str(MAX_STEPS),
        "--save-every", "7", "--eval-every", "50", "--log-every", "5", "--keep", "2", "--dropout", "0.1", "--quiet"]
# Fault points inside a save, each hit at the n-th save of a process.
FAULTS = ["save-state-written@2", "save-before-rename@3", "save-renamed@2", "save-pointer-moved@4",
          "save-state-written@5", "save-pointer-moved@1", "save-before-rename@1", "save-renamed@6"]


def _env(tmp_root: Path, fault: str | None = None) -> dict:
    env = dict(os.environ)
    # Deterministic CPU numerics: one intra-op thread, so every process computes identically.
    env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    env["CHARRNN_XLA_CACHE"] = str(tmp_root / "xla-cache")
    env.pop("CHARRNN_NO_XLA_CACHE", None)
    env.pop("CHARRNN_FAULT", None)
    if fault:
        env["CHARRNN_FAULT"] = fault
    return env


def _logged_steps(run: Path) -> int:
    try:
        return sum('"train"' in line for line in (run / "metrics.jsonl").open())
    except FileNotFoundError:
        return 0


def _train(corpus: Path, out: Path, env: dict, *, resume: bool, kill_at_record: int | None = None):
    """Run training; with ``kill_at_record``, SIGKILL it as soon as metrics.jsonl holds that many
    train records (polled every few milliseconds, so the kill lands anywhere in a step or save)."""
    cmd = [sys.executable, "-m", "charrnn.cli", "train", str(corpus), "--out", str(out), *ARGS]
    if resume:
        cmd.append("--resume")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    if kill_at_record is not None:
        while proc.poll() is None and _logged_steps(out) < kill_at_record:
            time.sleep(0.003)
        proc.kill()
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def _final_state(run: Path) -> tuple[dict, dict, list]:
    tensors, meta = ckpt.read_checkpoint(ckpt.resolve(run, "latest"))
    losses = [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if r["event"] == "train"]
    return tensors, meta, losses


@pytest.mark.skipif(jax.default_backend() != "cpu", reason=(
    "bit-identity across twenty processes holds on the CPU; on an H100 (2026-11-23) the carry drifted "
    "by ~1e-2 after twenty kills and resumes even with deterministic ops, autotuning off or no XLA cache "
    "(a stop and resume within one process is bit-identical there: the full-disk test here and "
    "test_train's test_resumed_run_equals_uninterrupted_run)"))
@pytest.mark.slow
def test_sigkill_at_twenty_moments_then_resume_is_bit_identical(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    ref = tmp_path / "reference"
    code, err = _train(corpus, ref, _env(tmp_path), resume=False)
    assert code == 0, err

    rng = random.Random(1234)
    run = tmp_path / "killed"
    kills = 0
    records = MAX_STEPS // 5
    for i in range(20):
        fault = FAULTS[i // 2 % len(FAULTS)] if i % 2 else None  # every other kill lands inside a save
        target = None if fault else min(records - 1, _logged_steps(run) + rng.randint(1, 8))
        code, err = _train(corpus, run, _env(tmp_path, fault), resume=(run / "config.json").exists(),
                           kill_at_record=target)
        assert "Traceback" not in err, err
        if code == 0:
            break  # finished before the kill
        assert code == -9, err
        kills += 1
        # Whatever moment the kill hit, a complete checkpoint (or none yet) is on disk.
        if (run / "latest").exists():
            ckpt.read_checkpoint(ckpt.resolve(run, "latest"))
    assert kills >= 15
    code, err = _train(corpus, run, _env(tmp_path), resume=True)
    assert code == 0, err

    ref_tensors, ref_meta, ref_losses = _final_state(ref)
    got_tensors, got_meta, got_losses = _final_state(run)
    assert got_meta["step"] == ref_meta["step"] == MAX_STEPS
    assert set(got_tensors) == set(ref_tensors)
    for name in ref_tensors:
        np.testing.assert_array_equal(got_tensors[name], ref_tensors[name], err_msg=name)
    for key in ("epoch", "window", "best_val", "best_step", "last_val", "log_losses"):
        assert got_meta[key] == ref_meta[key], key
    assert got_losses == ref_losses
    assert not list(run.glob(".tmp-*")) and not list(run.glob(ckpt.TMP_PREFIX + "*"))


# --- full disk -----------------------------------------------------------------------------

def _tiny_config(**train):
    return RunConfig(model=ModelConfig(hidden=8, layers=1),
                     train=TrainConfig(batch_size=2, seq_len=8, log_every=1, **train))


@pytest.mark.slow
def test_full_disk_stops_cleanly_and_resume_continues_exactly(tmp_path, monkeypatch):
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    config = _tiny_config(max_steps=12, save_every=4, eval_every=100)
    charrnn.train(str(corpus), config, out=tmp_path / "ref")

    real_write = ckpt._write_file

    def full_after_first_save(path, data):
        if "ckpt-00000008" in str(path):  # the disk is full when the second checkpoint is written
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write(path, data)

    charrnn.train(str(corpus), dataclasses.replace(config, train=dataclasses.replace(config.train, max_steps=4)),
                  out=tmp_path / "run")
    monkeypatch.setattr(ckpt, "_write_file", full_after_first_save)
    with pytest.raises(CharrnnError, match="no space left on device while writing .*ckpt-00000008"):
        charrnn.train(str(corpus), config, out=tmp_path / "run", resume=True)
    monkeypatch.setattr(ckpt, "_write_file", real_write)
    assert (tmp_path / "run" / "latest").read_text().strip() == "ckpt-00000004"
    assert not list((tmp_path / "run").glob(".tmp-*")) and not list((tmp_path / "run").glob(ckpt.TMP_PREFIX + "*"))
    charrnn.load(tmp_path / "run", "latest")  # the previous checkpoint still loads

    charrnn.train(str(corpus), config, out=tmp_path / "run", resume=True)
    ref, _ = ckpt.read_checkpoint(ckpt.resolve(tmp_path / "ref", "latest"))
    got, _ = ckpt.read_checkpoint(ckpt.resolve(tmp_path / "run", "latest"))
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)


# --- non-finite steps ----------------------------------------------------------------------

def _poison_steps(monkeypatch, bad_steps: set[int]):
    """Feed a NaN hidden state into the given (1-based) steps: their loss and gradient are NaN."""
    import jax
    import jax.numpy as jnp

    train_mod = sys.modules["charrnn.train"]  # `charrnn.train` itself is the function
    real = train_mod.make_train_step

    def make(*args, **kw):
        step_fn = real(*args, **kw)
        counter = {"n": 0}

        def step(state, carry, batch):
            counter["n"] += 1
            if counter["n"] in bad_steps:
                carry = jax.tree_util.tree_map(lambda c: jnp.full_like(c, jnp.nan), carry)
            return step_fn(state, carry, batch)

        return step

    monkeypatch.setattr(train_mod, "make_train_step", make)


def test_non_finite_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    _poison_steps(monkeypatch, {3, 4})
    events = []
    result = charrnn.train(str(corpus), _tiny_config(max_steps=6, eval_every=100), out=tmp_path / "run",
                           on_event=events.append)
    assert result.step == 6
    assert [e["step"] for e in events if e["event"] == "bad_step"] == [3, 4]
    logged = [r["step"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
              if r["event"] == "train"]
    assert logged == [1, 2, 5, 6]
    _, meta = ckpt.read_checkpoint(ckpt.resolve(tmp_path / "run", "latest"))
    assert meta["bad_total"] == 2 and meta["bad_in_a_row"] == 0


def test_too_many_bad_steps_in_a_row_stop_training_keeping_the_good_checkpoint(tmp_path, monkeypatch):
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    _poison_steps(monkeypatch, set(range(5, 100)))
    with pytest.raises(CharrnnError, match="3 steps in a row had a non-finite"):
        charrnn.train(str(corpus), _tiny_config(max_steps=50, save_every=2, eval_every=100, max_bad_steps=3),
                      out=tmp_path / "run")
    assert (tmp_path / "run" / "latest").read_text().strip() == "ckpt-00000004"
    charrnn.load(tmp_path / "run", "latest")


def test_the_package_has_no_pickle_or_eval():
    import re

    banned = re.compile(r"\bpickle\b|allow_pickle\s*=\s*True|(?<![\w.])(eval|exec)\(|\bmarshal\b")
    root = Path(charrnn.__file__).parent
    for path in root.rglob("*.py"):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            assert not banned.search(code) or "No pickle" in line, f"{path}:{n}: {line.strip()}"


@pytest.mark.slow
def test_reading_a_run_while_it_trains_never_sees_a_partial_checkpoint(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    run = tmp_path / "live"
    cmd = [sys.executable, "-m", "charrnn.cli", "train", str(corpus), "--out", str(run), *ARGS[:-1],
           "--save-every", "1", "--keep", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(tmp_path))
    loads = 0
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline and loads < 60:
            if (run / "latest").exists():
                model = charrnn.load(run, "latest")  # must never raise while training commits
                assert model.step >= 1
                loads += 1
            else:
                time.sleep(0.01)
    finally:
        proc.kill()
        proc.communicate()
    assert loads >= 20

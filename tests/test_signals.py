"""Ctrl-C and SIGTERM from the first instant: the command ends promptly with 130/143, one line,
no traceback, and never a half-written checkpoint (``charrnn.runtime.SignalWatcher``)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TEXT = "the cat sat on the mat. the dog sat on the log.\n" * 40

# Installs the watcher, then keeps the main thread in C (libc sleep: Python's own handlers
# cannot run there) as an XLA compile would, swallowing what Python raises when sleep returns
# (argv[1] == "unwind": as once the CLI runs, when Python's handler raises in the main thread).
_STUCK_IN_C = """
import ctypes, sys
from charrnn import runtime
w = runtime.install_signal_handling()
w.unwind = sys.argv[1] == "unwind"
for i in range(6):
    try:
        if i == 0:
            print("ready", flush=True)
        ctypes.CDLL(None).sleep(10)
    except KeyboardInterrupt:
        pass
print("slept through it", flush=True)
"""

_COOPERATIVE = """
import os, signal, sys, time
from charrnn import runtime
w = runtime.install_signal_handling()
w.cooperative = True  # a training loop that polls the flag is running
os.kill(os.getpid(), signal.SIGINT)
for _ in range(200):
    if w.reason:
        break
    time.sleep(0.01)
print("reason", w.reason, flush=True)
os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C: at once
time.sleep(30)
print("not reached", flush=True)
"""


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.parametrize("mode", ["unwind", "exit"])
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_ends_the_process_while_the_main_thread_is_in_c(sig, code, mode):
    p = subprocess.Popen([sys.executable, "-c", _STUCK_IN_C, mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=_env())
    try:
        assert p.stdout.readline().strip() == "ready"
        p.send_signal(sig)
        out, err = p.communicate(timeout=30)  # without the watcher: 60 s, then "slept through it"
    finally:
        p.kill()
    assert p.returncode == code, (out, err)
    assert "slept through it" not in out
    assert "Traceback" not in err
    assert [ln for ln in err.splitlines() if ln.strip()] == [f"charrnn: {signal.Signals(sig).name} received; stopped"]


def test_while_training_polls_the_first_sigint_sets_the_flag_the_second_exits():
    r = subprocess.run([sys.executable, "-c", _COOPERATIVE], capture_output=True, text=True, timeout=60, env=_env())
    assert r.stdout.splitlines()[0] == "reason SIGINT"
    assert "not reached" not in r.stdout
    assert r.returncode == 130, r.stderr
    assert "Traceback" not in r.stderr
    assert "interrupted again" in r.stderr


def test_the_library_and_a_test_runner_keep_python_level_handlers():
    from charrnn import runtime
    from charrnn.cli import SignalStop

    assert runtime.signal_watcher() is None  # pytest is not the charrnn command
    before = signal.getsignal(signal.SIGINT)
    with SignalStop() as stop:
        assert signal.getsignal(signal.SIGINT) is not before
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop() == "SIGTERM"
    assert signal.getsignal(signal.SIGINT) is before


def _train_command(corpus: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "charrnn", "train", str(corpus), "--out", str(out), "--max-steps", "100000",
            "--hidden", "8", "--layers", "1", "--batch-size", "2", "--seq-len", "8", "--eval-every", "50",
            "--quiet"]


@pytest.mark.slow
def test_sigint_at_random_moments_from_process_start(tmp_path):
    import charrnn

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    moments = random.Random(int(os.environ.get("CHARRNN_SIGNAL_SEED", "1"))).sample([x / 20 for x in range(0, 100)], 8)
    for i, delay in enumerate(sorted(moments)):
        out = tmp_path / f"run{i}"
        p = subprocess.Popen(_train_command(corpus, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=_env())
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        try:
            _, err = p.communicate(timeout=120)
        finally:
            p.kill()
        # 130: our handling; -SIGINT: killed before Python started (its default action).
        assert p.returncode in (130, -signal.SIGINT), (delay, p.returncode, err[-2000:])
        assert "Traceback" not in err, (delay, err[-2000:])
        if (out / "latest").exists():  # a checkpoint, if any, is complete
            run = charrnn.load(out, "latest")
            assert run.step >= 0


@pytest.mark.slow
def test_sampling_a_very_long_text_stops_on_sigint(tmp_path):
    import charrnn
    from charrnn.config import ModelConfig, RunConfig, TrainConfig

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    config = RunConfig(model=ModelConfig(cell="gru", layers=1, hidden=16),
                       train=TrainConfig(max_steps=40, batch_size=4, seq_len=16, eval_every=40, lr=1e-2))
    run_dir = charrnn.train(corpus, config, out=tmp_path / "run").run_dir
    # Greedy: the end token (once per document) is never the most likely next character, so
    # the text goes on until the signal.
    p = subprocess.Popen([sys.executable, "-m", "charrnn", "sample", str(run_dir), "--length", "100000000",
                          "--greedy"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    try:
        assert p.stdout.read(20)  # it is generating
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130, err[-2000:]
    assert b"Traceback" not in err

"""Data parallelism on CPU: 4 forced devices and 2 processes train like 1 device; a dead peer is noticed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from charrnn import checkpoint as ckpt
from charrnn.config import ModelConfig
from charrnn.parallel import sampling_devices, sampling_devices_for, step_weight_bytes, usable_cores

ARGS = ["--hidden", "16", "--layers", "2", "--batch-size", "8", "--seq-len", "16", "--eval-every", "10",
        "--dropout", "0.1", "--quiet"]


XLA_CACHE: list[Path] = []


@pytest.fixture(scope="module", autouse=True)
def shared_compilation_cache(tmp_path_factory):
    # This module's subprocesses compile the same programs: let them share a cache.
    XLA_CACHE.append(tmp_path_factory.mktemp("xla-cache"))
    yield
    XLA_CACHE.clear()


def _env(devices: int = 1, **extra) -> dict:
    env = dict(os.environ, CHARRNN_XLA_CACHE=str(XLA_CACHE[0]), **extra)
    env.pop("CHARRNN_NO_XLA_CACHE", None)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"  # CPU devices are under test, also on a machine with a GPU
    return env


def _cmd(corpus: Path, out: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "charrnn.cli", "train", str(corpus), "--out", str(out), *ARGS, *extra]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _params(run: Path) -> dict[str, np.ndarray]:
    tensors, meta = ckpt.read_checkpoint(ckpt.resolve(run, "latest"))
    return tensors, meta


def _assert_close(a: Path, b: Path):
    ta, ma = _params(a)
    tb, mb = _params(b)
    assert ma["step"] == mb["step"]
    assert set(ta) == set(tb)
    for k in ta:
        np.testing.assert_allclose(tb[k], ta[k], rtol=1e-5, atol=1e-5, err_msg=k)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("corpus") / "c.txt"
    p.write_text("the quick brown fox jumps over the lazy dog. " * 300, encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def one_device(corpus) -> Path:
    out = corpus.parent / "one"
    r = subprocess.run(_cmd(corpus, out, "--max-steps", "20"), env=_env(1), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.slow
def test_four_devices_match_one(corpus, one_device, tmp_path):
    r = subprocess.run(_cmd(corpus, tmp_path / "four", "--max-steps", "20"), env=_env(4),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    _assert_close(one_device, tmp_path / "four")


@pytest.mark.slow
def test_resume_on_a_different_number_of_devices(corpus, one_device, tmp_path):
    out = tmp_path / "mixed"
    r = subprocess.run(_cmd(corpus, out, "--max-steps", "10"), env=_env(4), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(_cmd(corpus, out, "--max-steps", "20", "--resume"), env=_env(2), capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    _assert_close(one_device, out)


@pytest.mark.slow
def test_batch_size_must_divide_by_the_devices(corpus, tmp_path):
    cmd = _cmd(corpus, tmp_path / "r", "--max-steps", "2") + ["--batch-size", "6"]
    r = subprocess.run(cmd, env=_env(4), capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip() == ("charrnn: error: --batch-size 6 must divide by the number of devices (4); "
                                "try --batch-size 4")
    assert not (tmp_path / "r").exists()


def test_auto_cpu_devices_is_one_per_core_when_the_batch_divides_evenly():
    from charrnn.parallel import auto_cpu_devices

    # (batch, cores) -> devices: at least 8 streams per device, and the batch must divide.
    cases = {(50, 2): 2, (64, 2): 2, (16, 2): 2, (15, 2): 1, (17, 2): 1, (8, 2): 1, (1, 2): 1,
             (64, 1): 1, (64, 16): 8, (50, 16): 5, (96, 4): 4, (100, 8): 5}
    assert {k: auto_cpu_devices(*k) for k in cases} == cases


def _env_without_forced_devices() -> dict:
    env = _env(1)
    env.pop("XLA_FLAGS")
    return env


@pytest.mark.slow
def test_cpu_devices_option_splits_the_cpu_and_trains_like_one_device(corpus, one_device, tmp_path):
    cmd = [a for a in _cmd(corpus, tmp_path / "split", "--max-steps", "20", "--cpu-devices", "2")
           if a != "--quiet"]
    r = subprocess.run(cmd, env=_env_without_forced_devices(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "parameters, 2 CPU devices ->" in r.stderr
    _assert_close(one_device, tmp_path / "split")


@pytest.mark.slow
def test_cpu_devices_that_do_not_divide_the_batch_are_refused(corpus, tmp_path):
    cmd = _cmd(corpus, tmp_path / "r", "--max-steps", "2", "--cpu-devices", "3")
    r = subprocess.run(cmd, env=_env_without_forced_devices(), capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip() == ("charrnn: error: --batch-size 8 must divide by the number of devices (3); "
                                "try --batch-size 6")
    assert not (tmp_path / "r").exists()


def _sample(run: Path, env: dict, num_samples: int) -> tuple[str, str]:
    cmd = [sys.executable, "-m", "charrnn.cli", "-v", "sample", str(run), "--num-samples", str(num_samples),
           "--length", "150", "--seed", "3", "--temperature", "1.5", "--json"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout, r.stderr


@pytest.mark.slow
def test_sampling_split_over_devices_draws_what_one_device_draws(one_device):
    one, log_one = _sample(one_device, _env(1), 32)
    four, log_four = _sample(one_device, _env(4), 32)
    assert "sampling 32 rows on 1 device(s)" in log_one
    assert "sampling 32 rows on 4 device(s)" in log_four
    assert len(one.splitlines()) == 32 and len(set(one.splitlines())) > 16  # the rows differ
    assert four == one
    # `charrnn sample` splits the CPU itself (one device per core) when that pays.
    split, log_split = _sample(one_device, _env_without_forced_devices(), 16)
    if usable_cores() >= 2:
        assert "sampling 16 rows on 2 device(s)" in log_split
    assert split == _sample(one_device, _env(1), 16)[0]


def test_sampling_devices_split_only_small_models_and_batches():
    lstm_2x128 = step_weight_bytes("lstm", 2, 128, 65)
    assert lstm_2x128 == 4 * (2 * 128 * 512 + 128 * 512 + 128 * 65)
    assert step_weight_bytes("rnn", 1, 512, 65) == 4 * (512 * 512 + 512 * 65)
    assert step_weight_bytes("gru", 2, 256, 65) == 4 * (2 * 256 * 768 + 256 * 768 + 256 * 65)
    l2 = 2 << 20
    cases = {  # (batch, weight bytes) -> devices on 2 cores with 2 MiB of L2 each
        (32, lstm_2x128): 2, (16, lstm_2x128): 2, (8, lstm_2x128): 1, (1, lstm_2x128): 1, (33, lstm_2x128): 1,
        (32, step_weight_bytes("gru", 2, 256, 65)): 2,
        (32, step_weight_bytes("gru", 1, 512, 65)): 1,
        (32, step_weight_bytes("lstm", 2, 512, 65)): 1,
    }
    assert {k: sampling_devices(*k, cores=2, l2_bytes=l2) for k in cases} == cases
    assert sampling_devices(64, lstm_2x128, cores=8, l2_bytes=l2) == 8
    # The same rule from a model's config, as `charrnn sample`, Run.stream and the benchmark use it.
    shapes = {("lstm", 2, 128): 2, ("gru", 2, 256): 2, ("gru", 1, 512): 1, ("lstm", 2, 512): 1}
    for (cell, layers, hidden), n in shapes.items():
        model = ModelConfig(cell=cell, layers=layers, hidden=hidden)
        assert sampling_devices_for(model, 65, 32, cores=2, l2_bytes=l2) == n, model


def _two_processes(corpus: Path, out: Path, *extra, env=None):
    port = _free_port()
    procs = []
    for pid in (1, 0):
        cmd = _cmd(corpus, out, *extra, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                   "--process-id", str(pid))
        procs.append(subprocess.Popen(cmd, env=env or _env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    return procs[1], procs[0]  # (process 0, process 1)


@pytest.mark.slow
def test_two_processes_train_together_like_one(corpus, one_device, tmp_path):
    p0, p1 = _two_processes(corpus, tmp_path / "two", "--max-steps", "20")
    out0, err0 = p0.communicate(timeout=300)
    out1, err1 = p1.communicate(timeout=300)
    assert p0.returncode == 0 and p1.returncode == 0, (err0, err1)
    assert "stopped at step 20" in err0 and "stopped at step" not in err1  # only process 0 reports
    _assert_close(one_device, tmp_path / "two")


@pytest.mark.slow
def test_a_dead_worker_makes_the_other_exit_instead_of_hanging(corpus, tmp_path):
    env = _env(1, CHARRNN_HEARTBEAT_S="3")
    p0, p1 = _two_processes(corpus, tmp_path / "dead", "--max-steps", "1000000", "--eval-every", "1000000",
                            env=env)
    metrics = tmp_path / "dead" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.stat().st_size > 0):
        assert time.monotonic() < deadline and p0.poll() is None, p0.stderr.read() if p0.poll() else "no start"
        time.sleep(0.1)
    p1.kill()
    killed_at = time.monotonic()
    _, err = p0.communicate(timeout=120)
    assert p0.returncode != 0
    assert time.monotonic() - killed_at < 60
    assert "another task died" in err or "unhealthy" in err
    p1.communicate()

"""The library leaves the host process as it found it; only the ``charrnn`` command tunes it.

Each check runs in a fresh interpreter: the pytest process itself has JAX started and (through
other tests) may have opted into ``charrnn.runtime``'s tuning.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Snapshot what a library could change behind its caller's back, use the library, compare.
_SNAPSHOT = r"""
import ctypes, json, os, signal, sys

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_ssize_t]

def big_malloc_grows_heap():
    # glibc serves 64 MiB with mmap by default; tuned (M_MMAP_MAX=0) it comes from the brk heap.
    before = libc.sbrk(0)
    p = libc.malloc(64 << 20)
    grew = libc.sbrk(0) - before >= (64 << 20)
    libc.free(p)
    return grew

def fds():
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return out

def snapshot():
    handlers = {}
    for s in signal.valid_signals():
        try:
            h = signal.getsignal(s)
        except (ValueError, OSError):
            continue
        handlers[int(s)] = repr(h)
    wakeup = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(wakeup)
    return {"env": dict(os.environ), "signals": handlers, "wakeup_fd": wakeup, "fds": fds(),
            "heap_malloc": big_malloc_grows_heap()}

before = snapshot()
import charrnn
from charrnn.config import ModelConfig, RunConfig, TrainConfig
after_import = snapshot()
corpus, out = sys.argv[1], sys.argv[2]
config = RunConfig(model=ModelConfig(cell="gru", layers=1, hidden=8),
                   train=TrainConfig(max_steps=2, batch_size=2, seq_len=8, eval_every=2))
result = charrnn.train(corpus, config, out=out)
run = charrnn.load(result.run_dir)
run.sample(length=5, seed=1)
run.evaluate("the cat sat")
errors = []
for bad in (1, 2.5, None):
    try:
        run.evaluate(bad)
    except (TypeError, charrnn.CharrnnError) as e:
        errors.append(str(e))
for bad in (1, 2):
    try:
        charrnn.load(bad)
    except (TypeError, charrnn.CharrnnError) as e:
        errors.append(str(e))
try:
    charrnn.train(1, config, out=out + "-x")
except (TypeError, charrnn.CharrnnError) as e:
    errors.append(str(e))
os.fstat(1); os.fstat(2)  # stdout and stderr still open
after = snapshot()
print(json.dumps({"before": before, "after_import": after_import, "after": after, "errors": errors}))
"""


def _clean_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "GLIBC_TUNABLES"))}
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    return env


@pytest.mark.slow
def test_train_load_sample_evaluate_leave_the_process_as_they_found_it(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat. the dog sat on the log.\n" * 20, encoding="utf-8")
    r = subprocess.run([sys.executable, "-c", _SNAPSHOT, str(corpus), str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=600, env=_clean_env())
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(r.stdout.strip().splitlines()[-1])
    before, after_import, after = s["before"], s["after_import"], s["after"]
    assert after_import == before  # import charrnn: nothing at all
    assert after["env"] == before["env"]  # nothing children would inherit (XLA_FLAGS, ...)
    assert after["signals"] == before["signals"] and after["wakeup_fd"] == before["wakeup_fd"]
    assert after["heap_malloc"] == before["heap_malloc"]  # malloc behaves as glibc's default
    # Every descriptor open before is still open, on the same file (the runtime may add its own).
    assert {fd: after["fds"].get(fd) for fd in before["fds"]} == before["fds"]
    assert len(s["errors"]) == 6
    assert all(("text" in e or "run" in e or "corpus" in e) for e in s["errors"]), s["errors"]


_SCRIPT_CALLING_MAIN = r"""
import os, sys
print("TOP-OF-SCRIPT", flush=True)
from charrnn import runtime
runtime.huge_pages_env = lambda *a, **k: dict(os.environ, CHARRNN_RERUN_MARK="1")  # "re-running would help"
import charrnn.cli
sys.argv = ["myscript", "train", "--help"]
try:
    charrnn.cli.main()
except SystemExit:
    pass
import signal
print("HANDLER", signal.getsignal(signal.SIGINT) is signal.default_int_handler, flush=True)
"""


def test_a_script_calling_cli_main_is_not_re_executed_and_keeps_its_signals(tmp_path):
    script = tmp_path / "myscript.py"
    script.write_text(_SCRIPT_CALLING_MAIN)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                       env=_clean_env())
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("TOP-OF-SCRIPT") == 1
    assert "Usage:" in r.stdout and "HANDLER True" in r.stdout


def test_the_command_is_recognised_as_such(tmp_path):
    code = "from charrnn import runtime; print(runtime.launched_as_command())"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=_clean_env())
    assert r.stdout.strip() == "False"
    console = tmp_path / "charrnn"  # what pip writes for the console script
    console.write_text("import sys\nfrom charrnn.cli import main\nfrom charrnn import runtime\n"
                       "print(runtime.launched_as_command(), runtime.signal_watcher() is not None)\n")
    r = subprocess.run([sys.executable, str(console)], capture_output=True, text=True, timeout=60, env=_clean_env())
    assert r.stdout.split() == ["True", "True"], r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "charrnn", "--version"], capture_output=True, text=True, timeout=60,
                       env=_clean_env())
    assert r.returncode == 0 and "version" in r.stdout

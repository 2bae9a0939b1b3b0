"""Corpora larger than memory: encoding streams to a memory map, so memory does not grow with size."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

CORPUS_MB = 200
PEAK_GROWTH_LIMIT_MB = 300  # the old in-memory path needed > 1000 MB more for 200 MB of text

MEASURE = """
import resource, runpy, sys
sys.argv = ["charrnn"] + sys.argv[1:]
try:
    runpy.run_module("charrnn.cli", run_name="__main__")
finally:
    print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def _write_corpus(path: Path, megabytes: int) -> None:
    rng = np.random.default_rng(0)
    words = np.array(["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "über", "naïve", "\n"])
    block = " ".join(rng.choice(words, 250_000)).encode("utf-8")  # about 1 MB
    with open(path, "wb") as f:
        for _ in range(-(-(megabytes << 20) // len(block))):
            f.write(block)


def _peak_rss_mb(corpus: Path, out: Path) -> float:
    cmd = [sys.executable, "-c", MEASURE, "train", str(corpus), "--out", str(out), "--hidden", "32",
           "--batch-size", "8", "--seq-len", "16", "--max-steps", "3", "--eval-every", "1000",
           "--val-frac", "0.0005", "--quiet"]
    env = dict(os.environ, CHARRNN_NO_XLA_CACHE="1")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    kb = [int(line.split()[1]) for line in r.stderr.splitlines() if line.startswith("PEAK_RSS_KB")]
    return kb[0] / 1024


@pytest.mark.slow
def test_training_memory_does_not_grow_with_corpus_size(tmp_path):
    small, large = tmp_path / "small.txt", tmp_path / "large.txt"
    _write_corpus(small, 1)
    _write_corpus(large, CORPUS_MB)
    base = _peak_rss_mb(small, tmp_path / "run-small")
    peak = _peak_rss_mb(large, tmp_path / "run-large")
    tokens = np.load(tmp_path / "run-large" / "tokens.npy", mmap_mode="r")
    assert tokens.dtype == np.uint16 and len(tokens) > CORPUS_MB * 1_000_000 * 0.99
    assert peak - base < PEAK_GROWTH_LIMIT_MB, (base, peak)

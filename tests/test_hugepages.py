"""``charrnn.runtime``'s huge pages: when ``charrnn train`` re-runs itself with glibc's hugetlb tunable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from charrnn import runtime
from charrnn.cli import _command

GLIBC = ("glibc", "2.36")


def test_the_tunable_is_added_where_thp_is_madvise_and_glibc_reads_it():
    env = runtime.huge_pages_env({"PATH": "/bin"}, mode="madvise", libc=GLIBC)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    # other tunables are kept
    env = runtime.huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, mode="madvise", libc=GLIBC)
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


@pytest.mark.parametrize("environ,mode,libc", [
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", GLIBC),  # the user said no (or yes: no loop)
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, "madvise", GLIBC),
    ({}, "always", GLIBC),  # huge pages already
    ({}, "never", GLIBC),  # none to be had
    ({}, "", GLIBC),  # no THP file
    ({}, "madvise", ("glibc", "2.34")),  # before the tunable existed
    ({}, "madvise", ("", "")),  # musl, or unknown
])
def test_nothing_changes_where_the_tunable_would_not_help(environ, mode, libc):
    assert runtime.huge_pages_env(environ, mode=mode, libc=libc) is None


def test_the_running_c_library_names_itself():
    name, version = runtime.running_libc()
    if name:  # glibc answers confstr; others say nothing, and nothing is re-run there
        assert name == "glibc" and version.split(".")[0].isdigit()


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert runtime.thp_mode(str(f)) == "madvise"
    f.write_text("[always] madvise never\n")
    assert runtime.thp_mode(str(f)) == "always"
    assert runtime.thp_mode(str(tmp_path / "missing")) is None


def test_only_train_re_runs():
    assert _command(["train", "x.txt"]) == "train"
    assert _command(["--debug", "-v", "train", "x.txt"]) == "train"
    assert _command(["sample", "run", "--prime", "train"]) == "sample"
    assert _command(["--help"]) is None


@pytest.mark.slow
def test_charrnn_train_runs_with_the_tunable_set(tmp_path):
    # A real `charrnn train` process: where the host allows it, the training code sees the
    # tunable in its own environment (the re-run happened: this test did not set it).
    if runtime.huge_pages_env({}) is None:
        pytest.skip(f"THP mode {runtime.thp_mode()!r}, C library {runtime.running_libc()}: nothing to re-run for")
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("hello world, this is a tiny corpus for a test\n" * 40)
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, str(root / "cli.py"), "-v", "train", str(corpus), "--out", str(tmp_path / "run"),
           "--max-steps", "1", "--hidden", "16", "--batch-size", "4", "--seq-len", "20", "-q"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "malloc: GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in r.stderr
    # and one the user turned off stays off
    env["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=0"
    r = subprocess.run(cmd + ["--overwrite"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "malloc: GLIBC_TUNABLES=glibc.malloc.hugetlb=0" in r.stderr

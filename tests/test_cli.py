"""The command line through click's test runner: commands work, and bad input is refused cleanly."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import assert_refused

from charrnn.cli import cli

TINY = ["--hidden", "8", "--layers", "1", "--batch-size", "2", "--seq-len", "8", "--eval-every", "2",
        "--log-every", "1", "--quiet"]
TEXT = "the cat sat on the mat. the dog sat on the log.\n" * 6


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny trained run shared by the read-only commands."""
    d = tmp_path_factory.mktemp("trained")
    corpus = d / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    r = run("train", corpus, "--out", d / "run", "--max-steps", 4, *TINY)
    assert r.exit_code == 0, r.output
    return d / "run"


def test_train_writes_a_complete_run_directory(trained):
    names = {p.name for p in trained.iterdir()}
    assert {"config.json", "vocab.json", "metrics.jsonl", "latest", "best"} <= names
    assert (trained / "latest").read_text().strip() == "ckpt-00000004"
    records = [json.loads(ln) for ln in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in records if r["event"] == "eval"] == [2, 4]
    config = json.loads((trained / "config.json").read_text())
    assert config["model"]["hidden"] == 8 and config["train"]["batch_size"] == 2


def test_sample_prints_the_prime_then_text(trained):
    r = run("sample", trained, "--prime", "the ", "--length", 30, "--seed", 3)
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("the ")
    assert 4 < len(r.stdout.rstrip("\n")) <= 4 + 30
    again = run("sample", trained, "--prime", "the ", "--length", 30, "--seed", 3)
    assert again.stdout == r.stdout


def test_sample_json_one_object_per_sample(trained):
    r = run("sample", trained, "--json", "-n", 3, "--length", 20, "--seed", 0, "--top-k", 1000)
    assert r.exit_code == 0, r.output
    rows = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert len(rows) == 3
    assert all(set(row) == {"text", "ended", "finish"} for row in rows)
    assert all(len(row["text"]) <= 20 for row in rows)


def test_greedy_sampling_is_deterministic_without_a_seed(trained):
    a = run("sample", trained, "--greedy", "--length", 25).stdout
    b = run("sample", trained, "--greedy", "--length", 25).stdout
    assert a == b


def test_info_and_eval(trained, tmp_path):
    r = run("info", trained, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["step"] == 4 and info["vocab_size"] == len(set(TEXT)) + 2
    assert info["params"] == (len(set(TEXT)) + 2) * 8 * 4 + 8 * 8 * 4 + 8 * 4 + 8 * (len(set(TEXT)) + 2) + len(set(TEXT)) + 2
    text = tmp_path / "t.txt"
    text.write_text(TEXT[:100])
    r = run("eval", trained, text, "--json")
    assert r.exit_code == 0, r.output
    ev = json.loads(r.stdout)
    assert ev["chars"] == 101  # 100 characters and the end token
    assert ev["bits"] == pytest.approx(ev["nats"] / 0.6931471805599453)
    assert ev["perplexity"] == pytest.approx(2.718281828459045 ** ev["nats"])


def test_resume_continues_to_the_new_step_count(trained, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    corpus = trained.parent / "corpus.txt"
    r = run("train", corpus, "--out", run_dir, "--resume", "--max-steps", 6, "--quiet")
    assert r.exit_code == 0, r.output
    assert (run_dir / "latest").read_text().strip() == "ckpt-00000006"
    steps = [json.loads(ln)["step"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(ln)["event"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_a_different_architecture(trained):
    before = tree_digest(trained)
    r = run("train", trained.parent / "corpus.txt", "--out", trained, "--resume", "--hidden", 16)
    assert_refused(r, "model.hidden", "8", "16")
    assert tree_digest(trained) == before


def test_training_into_an_existing_run_is_refused(trained):
    before = tree_digest(trained)
    r = run("train", trained.parent / "corpus.txt", "--out", trained, *TINY)
    assert_refused(r, "--resume")
    assert tree_digest(trained) == before


# --- bad input table -----------------------------------------------------------------------

def _write(tmp_path, name, data: bytes):
    p = tmp_path / name
    p.write_bytes(data)
    return p


BAD_CORPORA = {
    "empty": (b"", "empty"),
    "whitespace-only": (b"   \n\n  \n", "too small"),
    "binary": (bytes(range(256)) * 4, "not valid utf-8"),
    "invalid-utf8": (b"hello \xff world" * 10, "offset 6"),
    "one-char": (b"a", "too small"),
    "shorter-than-a-batch": (b"abcdefghij", "needs 17"),
}


@pytest.mark.parametrize("name", sorted(BAD_CORPORA))
def test_bad_corpus_is_refused(tmp_path, name):
    data, fragment = BAD_CORPORA[name]
    corpus = _write(tmp_path, "c.txt", data)
    out = tmp_path / "run"
    r = run("train", corpus, "--out", out, *TINY, "--max-steps", 1)
    assert_refused(r, fragment)
    assert not out.exists() or not any(out.iterdir())


def test_whitespace_only_line_corpus_is_empty(tmp_path):
    corpus = _write(tmp_path, "c.txt", b"  \n\n \n")
    assert_refused(run("train", corpus, "--docs", "line", "--out", tmp_path / "r", *TINY), "empty")


def test_missing_path_and_empty_directory(tmp_path):
    assert_refused(run("train", tmp_path / "nope.txt", *TINY), "no such file")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "image.bin").write_bytes(b"\0\1\2\3")
    assert_refused(run("train", tmp_path / "empty", "--out", tmp_path / "r", *TINY), "no text files")


def test_bom_is_stripped_and_crlf_kept(tmp_path):
    corpus = _write(tmp_path, "c.txt", b"\xef\xbb\xbf" + ("ab\r\ncd\r\n" * 20).encode())
    r = run("train", corpus, "--out", tmp_path / "run", *TINY, "--max-steps", 1)
    assert r.exit_code == 0, r.output
    chars = json.loads((tmp_path / "run" / "vocab.json").read_text(encoding="utf-8"))["chars"]
    assert chars == ["\n", "\r", "a", "b", "c", "d"]


def test_emoji_and_combining_characters_are_single_characters(tmp_path):
    text = "e\u0301👍🏽 naïve 日本 " * 10
    corpus = _write(tmp_path, "c.txt", text.encode("utf-8"))
    r = run("train", corpus, "--out", tmp_path / "run", *TINY, "--max-steps", 1)
    assert r.exit_code == 0, r.output
    chars = json.loads((tmp_path / "run" / "vocab.json").read_text(encoding="utf-8"))["chars"]
    assert chars == sorted(set(text))
    assert "\u0301" in chars and "👍" in chars and "🏽" in chars


def test_latin1_corpus_with_encoding_flag(tmp_path):
    corpus = _write(tmp_path, "c.txt", ("caf\xe9 " * 10).encode("latin-1"))
    assert_refused(run("train", corpus, "--out", tmp_path / "r1", *TINY, "--max-steps", 1), "--encoding")
    r = run("train", corpus, "--encoding", "latin-1", "--out", tmp_path / "r2", *TINY, "--max-steps", 1)
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("args, fragment", [
    (["--prime", "Zq\u0436"], "U+0436"),
    (["--temperature", "0"], "--temperature"),
    (["--temperature", "-1"], "--temperature"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
    (["--top-k", "0"], "--top-k"),
    (["--length", "0"], "--length"),
    (["--num-samples", "0"], "--num-samples"),
    (["--checkpoint", "worst"], "worst"),
])
def test_bad_sample_options_are_refused(trained, args, fragment):
    assert_refused(run("sample", trained, *args), fragment)


def test_top_k_larger_than_the_vocabulary_is_allowed(trained):
    r = run("sample", trained, "--top-k", 10_000, "--length", 10, "--seed", 1)
    assert r.exit_code == 0, r.output


def test_run_directory_without_checkpoint(tmp_path):
    (tmp_path / "run").mkdir()
    assert_refused(run("sample", tmp_path / "run"), "no checkpoint")
    assert_refused(run("sample", tmp_path / "missing"), "no such run directory")


def test_unknown_option_is_one_line(trained):
    assert_refused(run("train", "x.txt", "--bogus"), "--bogus")


def test_corpora_lists_the_builtins():
    r = run("corpora")
    assert r.exit_code == 0, r.output
    for name in ("python-docs", "python-code", "tinyshakespeare", "enwik8", "text8"):
        assert name in r.stdout


@pytest.mark.slow
def test_launcher_script_runs_from_a_checkout():
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "cli.py"), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "train" in r.stdout and "sample" in r.stdout


# --- signals --------------------------------------------------------------------------------

def _start_training(tmp_path, *extra):
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT * 20, encoding="utf-8")
    env = dict(os.environ, CHARRNN_NO_XLA_CACHE="1")
    cmd = [sys.executable, "-m", "charrnn.cli", "train", str(corpus), "--out", str(tmp_path / "run"),
           "--max-steps", "100000", "--eval-every", "100000", *TINY, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env), corpus


def _wait_for_steps(path: Path, n: int, proc, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and sum('"train"' in line for line in path.open()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read())
        time.sleep(0.05)
    raise AssertionError("training did not start")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.slow
def test_signal_saves_a_checkpoint_and_exits_with_the_signal_code(tmp_path, sig, code):
    proc, corpus = _start_training(tmp_path)
    _wait_for_steps(tmp_path / "run" / "metrics.jsonl", 3, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    latest = (tmp_path / "run" / "latest").read_text().strip()
    saved_step = int(latest.split("-")[1])
    logged = [json.loads(ln)["step"] for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert saved_step >= 3 and saved_step == max(logged)
    # and the run continues from there
    r = run("train", corpus, "--out", tmp_path / "run", "--resume", "--max-steps", saved_step + 2, "--quiet")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run" / "latest").read_text().strip() == f"ckpt-{saved_step + 2:08d}"

"""Run directories that cannot be clobbered: a marker, one writer, only charrnn's files removed,
--overwrite that never loses the old run, no writes through links, no non-finite checkpoints,
damaged metrics and meta files, and evaluations that a stop request cuts short."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import charrnn
from charrnn import checkpoint as ckpt
from charrnn import data as data_mod
from charrnn import runs
from charrnn.config import ModelConfig, RunConfig, TrainConfig
from charrnn.errors import CharrnnError, CheckpointError
from charrnn.vocab import Vocab

TEXT = "the cat sat on the mat. the dog sat on the log.\n" * 8


def tiny(**train) -> RunConfig:
    train = {"batch_size": 2, "seq_len": 8, "max_steps": 4, "eval_every": 2, "log_every": 1, **train}
    return RunConfig(model=ModelConfig(hidden=8, layers=1), train=TrainConfig(**train))


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "c.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """A finished tiny run (4 steps) and its corpus; tests copy it before changing anything."""
    root = tmp_path_factory.mktemp("finished")
    corpus = root / "c.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    charrnn.train(str(corpus), tiny(), out=root / "run")
    return root / "run", corpus


def copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, symlinks=True)
    return dst


def digest(root: Path) -> dict[str, str]:
    """Every file's SHA-256 but the lock's (it names the last process that held it)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != runs.LOCK_FILE}


def user_files(d: Path) -> dict[str, bytes]:
    (d / ".tmp-notes").write_text("my notes", encoding="utf-8")
    (d / "ckpt-photos").mkdir()
    (d / "ckpt-photos" / "cat.jpg").write_bytes(b"\xff\xd8 a cat")
    (d / "ckpt-photos" / "manifest.json").write_text("{}", encoding="utf-8")
    return {".tmp-notes": b"my notes", "ckpt-photos/cat.jpg": b"\xff\xd8 a cat"}


# --- 1. a run is recognised by its marker; other directories are never written into --------

def test_a_run_directory_carries_a_versioned_marker(finished):
    run, _ = finished
    marker = json.loads((run / runs.MARKER_FILE).read_text(encoding="utf-8"))
    assert marker == {"format": "charrnn-run", "version": 1}
    assert runs.is_run(run)


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_directory_of_the_users_files_is_refused_even_with_overwrite(tmp_path, corpus, overwrite):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text('{"theme": "dark"}', encoding="utf-8")  # a config of something else
    user_files(out)
    before = digest(out)
    with pytest.raises(CharrnnError, match=f"{out} is not empty and not a charrnn run") as e:
        charrnn.train(str(corpus), tiny(), out=out, overwrite=overwrite)
    assert "config.json" in str(e.value)
    assert digest(out) == before and sorted(p.name for p in out.iterdir()) == [".tmp-notes", "ckpt-photos",
                                                                                "config.json"]


def test_an_empty_existing_directory_is_fine(tmp_path, corpus):
    (tmp_path / "empty").mkdir()
    result = charrnn.train(str(corpus), tiny(max_steps=2), out=tmp_path / "empty")
    assert result.step == 2 and runs.is_run(tmp_path / "empty")


def test_a_run_written_before_the_marker_is_recognised_and_marked(finished, tmp_path):
    run, corpus = finished
    old = copy_run(run, tmp_path / "old")
    (old / runs.MARKER_FILE).unlink()
    (old / runs.LOCK_FILE).unlink()
    assert runs.is_run(old)
    with pytest.raises(CharrnnError, match="already holds a run: pass --resume"):
        charrnn.train(str(corpus), tiny(), out=old)
    charrnn.train(str(corpus), tiny(max_steps=5), out=old, resume=True)
    assert (old / runs.MARKER_FILE).is_file() and ckpt.read_pointer(old, "latest") == "ckpt-00000005"


# --- 2. only what charrnn wrote is ever removed ---------------------------------------------

def test_overwrite_and_cleanup_remove_only_charrnns_own_files(finished, tmp_path):
    run, corpus = finished
    out = copy_run(run, tmp_path / "run")
    mine = user_files(out)
    (out / f"{ckpt.TMP_PREFIX}ckpt-00000009-1").mkdir()  # charrnn's own leftovers go
    (out / ".tmp2-tokens.npy-77").write_bytes(b"x")  # (and an older version's)
    charrnn.train(str(corpus), tiny(max_steps=2), out=out, overwrite=True)
    for name, data in mine.items():
        assert (out / name).read_bytes() == data
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["ckpt-00000002"]
    assert not (out / f"{ckpt.TMP_PREFIX}ckpt-00000009-1").exists() and not (out / ".tmp2-tokens.npy-77").exists()
    assert not (out / runs.REPLACED_DIR).exists()


def test_clean_temporaries_takes_only_charrnn_names(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    keep = [".tmp-notes", ".tmp-", "ckpt-photos", ".tmp-ckpt-photos-1", "tmp-config.json-3"]
    for name in keep:
        (d / name).write_text("mine")
    gone = [f"{ckpt.TMP_PREFIX}config.json-12", f"{ckpt.TMP_PREFIX}2-tokens.npy-5", ".tmp-vocab.json-12",
            ".tmp2-tokens.npy-99", ".tmp-tokens-p1.npy-4"]
    for name in gone:
        (d / name).write_text("x")
    assert ckpt.clean_temporaries(d) == len(gone)
    assert sorted(p.name for p in d.iterdir()) == sorted(keep)


# --- 3. --overwrite never loses the old run --------------------------------------------------

@pytest.mark.parametrize("failure", [RuntimeError("boom"), KeyboardInterrupt()])
def test_a_failed_overwrite_leaves_the_old_run_bit_identical(finished, tmp_path, monkeypatch, failure):
    run, corpus = finished
    out = copy_run(run, tmp_path / "run")
    before = digest(out)
    train_mod = sys.modules["charrnn.train"]

    def fail(*args, **kwargs):  # after the old run was set aside and the new one's files written
        assert (out / runs.REPLACED_DIR).is_dir()
        raise failure

    monkeypatch.setattr(train_mod, "make_train_step", fail)
    with pytest.raises(type(failure)):
        charrnn.train(str(corpus), tiny(max_steps=2, seed=9), out=out, overwrite=True)
    assert digest(out) == before
    assert charrnn.load(out, "latest").step == 4


def test_an_overwrite_killed_before_its_first_commit_is_undone_at_the_next_start(finished, tmp_path):
    run, corpus = finished
    out = copy_run(run, tmp_path / "run")
    before = digest(out)
    env = dict(os.environ, CHARRNN_FAULT="save-state-written@1", CHARRNN_NO_XLA_CACHE="1")
    cmd = [sys.executable, "-m", "charrnn.cli", "train", str(corpus), "--out", str(out), "--overwrite",
           "--hidden", "8", "--layers", "1", "--batch-size", "2", "--seq-len", "8", "--max-steps", "2", "--quiet"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr  # killed inside its first save
    assert (out / runs.REPLACED_DIR).is_dir()
    result = charrnn.train(str(corpus), None, out=out, resume=True)  # the next start puts the old run back
    assert (result.step, result.stop_reason) == (4, "steps")
    assert digest(out) == before


# --- 4. one writer per run ------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["resume", "overwrite"])
def test_a_locked_run_is_refused_at_once_naming_the_holder(finished, tmp_path, mode):
    run, corpus = finished
    out = copy_run(run, tmp_path / "run")
    before = digest(out)
    with runs.RunLock(out):
        with pytest.raises(CharrnnError, match=f"being trained by another process \\(pid {os.getpid()}\\)"):
            charrnn.train(str(corpus), tiny(max_steps=6), out=out, **{mode: True})
    assert digest(out) == before


@pytest.mark.slow
def test_two_trainings_into_one_directory_cannot_both_run(tmp_path, corpus):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "charrnn.cli", "train", str(corpus), "--out", str(out), "--hidden", "8",
           "--layers", "1", "--batch-size", "2", "--seq-len", "8", "--max-steps", "1000000", "--log-every", "1",
           "--quiet"]
    proc = subprocess.Popen(cmd, env=dict(os.environ, CHARRNN_NO_XLA_CACHE="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not ((out / runs.METRICS_FILE).exists() and (out / runs.METRICS_FILE).read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.05)
        for kwargs in ({"resume": True}, {"overwrite": True}):
            with pytest.raises(CharrnnError, match=f"being trained by another process \\(pid {proc.pid}\\)"):
                charrnn.train(str(corpus), tiny(max_steps=2), out=out, **kwargs)
    finally:
        proc.kill()
        proc.communicate()
    # The kernel dropped the killed holder's lock: no stale lock blocks the next run.
    charrnn.train(str(corpus), tiny(max_steps=2), out=out, overwrite=True)


# --- 5. nothing written through a link ------------------------------------------------------

def test_no_write_or_removal_through_symbolic_links(finished, tmp_path):
    run, corpus = finished
    out = copy_run(run, tmp_path / "run")
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.txt"
    victim.write_text("precious", encoding="utf-8")
    (outside / "ckpt-00000099").mkdir()
    (outside / "ckpt-00000099" / ckpt.MANIFEST_FILE).write_text("{}", encoding="utf-8")
    (outside / "link.jsonl").symlink_to(victim)
    with pytest.raises(CharrnnError, match="symbolic link"):
        ckpt.append_line(outside / "link.jsonl", "{}")
    (out / "ckpt-00000099").symlink_to(outside / "ckpt-00000099")
    with pytest.raises(CharrnnError, match="symbolic link"):
        ckpt.write_checkpoint(out, 99, {"w": np.zeros(2, np.float32)}, {"step": 99})
    assert ckpt.list_checkpoints(out) and all(not p.is_symlink() for p in ckpt.list_checkpoints(out))
    (out / runs.METRICS_FILE).unlink()
    (out / runs.METRICS_FILE).symlink_to(victim)
    (out / f"{ckpt.TMP_PREFIX}tokens.npy-{os.getpid()}").symlink_to(victim)
    charrnn.train(str(corpus), tiny(max_steps=6), out=out, resume=True)  # prunes, rewrites metrics, tokens
    charrnn.train(str(corpus), tiny(max_steps=2), out=out, overwrite=True)  # removes the old run
    assert victim.read_text(encoding="utf-8") == "precious"
    assert (outside / "ckpt-00000099" / ckpt.MANIFEST_FILE).read_text(encoding="utf-8") == "{}"
    assert not (out / runs.METRICS_FILE).is_symlink()


def test_the_token_file_temporaries_never_follow_a_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious", encoding="utf-8")
    out = tmp_path / "tokens.npy"
    for name in (f"{ckpt.TMP_PREFIX}tokens.npy-{os.getpid()}", f"{ckpt.TMP_PREFIX}2-tokens.npy-{os.getpid()}"):
        (tmp_path / name).symlink_to(victim)
    corpus = data_mod.Corpus("c", (("a", "abc"),))
    data_mod.encode_corpus(corpus, "file", Vocab(("a", "b", "c")), out)
    assert victim.read_text(encoding="utf-8") == "precious" and np.load(out).tolist() == [0, 2, 3, 4, 1]


def test_an_out_that_cannot_be_created_is_one_clear_error(tmp_path, corpus):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CharrnnError, match="cannot create the run directory .*file/run"):
        charrnn.train(str(corpus), tiny(), out=tmp_path / "file" / "run")
    with pytest.raises(CharrnnError, match="exists and is not a directory"):
        charrnn.train(str(corpus), tiny(), out=tmp_path / "file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_parent_is_one_clear_error(tmp_path, corpus):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        with pytest.raises(CharrnnError, match="cannot create the run directory"):
            charrnn.train(str(corpus), tiny(), out=parent / "run")
    finally:
        parent.chmod(0o755)


# --- 6. non-finite state is never committed -------------------------------------------------

def test_the_checkpoint_writer_refuses_non_finite_values(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(CharrnnError, match="tensor params/w holds NaN or infinite"):
        ckpt.write_checkpoint(tmp_path / "run", 3, {"params/w": np.array([1.0, np.inf], np.float32)}, {"step": 3})
    assert list((tmp_path / "run").iterdir()) == []


def test_a_learning_rate_that_overflows_the_parameters_fails_the_run_without_a_checkpoint(tmp_path, corpus,
                                                                                          monkeypatch):
    """As if ``--lr inf`` got through: every update makes the parameters non-finite."""
    train_mod = sys.modules["charrnn.train"]
    real = train_mod.make_optimizer
    monkeypatch.setattr(train_mod, "make_optimizer", lambda cfg, lr: real(cfg, float("inf")))
    events = []
    with pytest.raises(CharrnnError, match="non-finite loss, gradient or parameters; nothing of them was saved"):
        charrnn.train(str(corpus), tiny(max_steps=3, eval_every=100), out=tmp_path / "run", on_event=events.append)
    assert [e["step"] for e in events if e["event"] == "bad_step"] == [1, 2, 3]
    assert ckpt.read_pointer(tmp_path / "run", "latest") is None and not ckpt.list_checkpoints(tmp_path / "run")


# --- 7. damaged metrics lines and meta fields -----------------------------------------------

def test_damaged_metrics_lines_never_block_resume(finished, tmp_path, caplog):
    run, corpus = finished
    out = copy_run(run, tmp_path / "run")
    lines = (out / runs.METRICS_FILE).read_text(encoding="utf-8").splitlines()
    bad = ["not json {", "[1, 2]", '{"event": "train", "step": "three"}', '{"event": "train", "step": 2.5}']
    (out / runs.METRICS_FILE).write_text("\n".join(lines[:2] + bad + lines[2:]) + "\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="charrnn.runs"):
        charrnn.train(str(corpus), tiny(max_steps=6), out=out, resume=True)
    warned = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(warned) == 4 and all("skipped" in w for w in warned)
    steps = [r["step"] for r in runs.read_metrics(out) if r["event"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]


def _edit_meta(ck_dir: Path, **fields) -> None:
    """Change meta.json fields and re-seal the manifest, as a careful tamperer would."""
    meta = json.loads((ck_dir / ckpt.META_FILE).read_text())
    meta.update(fields)
    data = json.dumps(meta).encode()
    (ck_dir / ckpt.META_FILE).write_bytes(data)
    manifest = json.loads((ck_dir / ckpt.MANIFEST_FILE).read_text())
    manifest["files"][ckpt.META_FILE] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (ck_dir / ckpt.MANIFEST_FILE).write_text(json.dumps(manifest))


@pytest.mark.parametrize("field, value", [("best_val", "low"), ("bad_in_a_row", -1), ("log_losses", [1.0, "x"]),
                                          ("evals_since_best", True), ("last_val", {"nats": None}),
                                          ("step", "4")])
def test_a_meta_field_of_the_wrong_type_names_the_file_and_field(finished, tmp_path, field, value):
    run, corpus = finished
    out = copy_run(run, tmp_path / "run")
    ck_dir = ckpt.resolve(out, "latest")
    _edit_meta(ck_dir, **{field: value})
    with pytest.raises(CheckpointError, match=f"{ck_dir / ckpt.META_FILE}: field '{field}'"):
        charrnn.train(str(corpus), tiny(max_steps=6), out=out, resume=True)


# --- 8. a stop request cuts an evaluation short ---------------------------------------------

def test_a_stop_during_an_evaluation_abandons_it_then_saves_the_step(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT * 6, encoding="utf-8")
    stop = {"at": None, "polls": 0}

    def on_event(e):
        if e["event"] == "step" and e["step"] == 2:
            stop["at"] = "SIGINT"  # arrives just before the evaluation at step 2

    def should_stop():
        stop["polls"] += stop["at"] is not None
        return stop["at"]

    config = tiny(max_steps=100, eval_every=2, seq_len=4, batch_size=2)
    config = RunConfig(model=config.model, data=config.data.__class__(val_frac=0.5), train=config.train)
    result = charrnn.train(str(corpus), config, out=tmp_path / "run", on_event=on_event, should_stop=should_stop)
    assert (result.step, result.stop_reason) == (2, "SIGINT")
    assert [r for r in runs.read_metrics(tmp_path / "run") if r["event"] == "eval"] == []
    assert ckpt.read_pointer(tmp_path / "run", "latest") == "ckpt-00000002"
    _, meta = ckpt.read_checkpoint(ckpt.resolve(tmp_path / "run", "latest"))
    assert meta["last_val"] is None and meta["step"] == 2


# --- the command line: one line, nothing changed ---------------------------------------------

def _cli(*args):
    from click.testing import CliRunner

    from charrnn.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def _one_error_line(result, *fragments):
    assert result.exit_code != 0, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("charrnn: error: "), result.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])


TINY_ARGS = ["--hidden", "8", "--layers", "1", "--batch-size", "2", "--seq-len", "8", "--max-steps", "2", "--quiet"]


def test_the_cli_refuses_a_users_directory_in_one_line(tmp_path, corpus):
    out = tmp_path / "mine"
    out.mkdir()
    user_files(out)
    before = digest(out)
    _one_error_line(_cli("train", corpus, "--out", out, "--overwrite", *TINY_ARGS), str(out), "not a charrnn run")
    assert digest(out) == before


def test_the_cli_overwrite_with_a_seed_it_cannot_use_keeps_the_old_run(finished, tmp_path):
    run, corpus = finished
    out = copy_run(run, tmp_path / "run")
    before = digest(out)
    _one_error_line(_cli("train", corpus, "--out", out, "--overwrite", "--seed", 2 ** 64, *TINY_ARGS))
    assert digest(out) == before and charrnn.load(out, "latest").step == 4

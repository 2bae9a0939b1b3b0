"""Run directories: what makes one (a marker), its one writer (a lock), its config, vocabulary
and metrics files, and replacing a run without ever losing it or a user's own files."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Optional

from charrnn import checkpoint as ckpt
from charrnn.config import RunConfig
from charrnn.errors import CharrnnError, CheckpointError
from charrnn.vocab import Vocab, describe_chars

log = logging.getLogger(__name__)

CONFIG_FILE, VOCAB_FILE, METRICS_FILE = "config.json", "vocab.json", "metrics.jsonl"
TOKENS_FILE = "tokens.npy"  # the encoded corpus, memory-mapped while training
MARKER_FILE = ".charrnn-run"  # JSON {"format": "charrnn-run", "version": 1}: this directory is a run
LOCK_FILE = ".charrnn-lock"  # flock()ed by the one process training the run; holds its pid
REPLACED_DIR = ".charrnn-replaced"  # --overwrite: the old run's files until the new run's first commit
MARKER = {"format": "charrnn-run", "version": 1}
_TOKENS_OF_PROCESS = re.compile(r"tokens-p\d+\.npy")
# Files and folders that hold nothing of the user's: a directory holding only these is empty.
_CONTROL = (MARKER_FILE, LOCK_FILE)


# --- run directory files -----------------------------------------------------------------

def write_run_files(run_dir: Path, config: RunConfig, vocab: Vocab) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write(run_dir / CONFIG_FILE, config.to_json())
    ckpt.atomic_write(run_dir / VOCAB_FILE, vocab.to_json())


def read_run_files(run_dir: Path) -> tuple[RunConfig, Vocab]:
    """The config and vocabulary of a run directory; ``CheckpointError`` naming the file if bad."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run directory")
    raw = ckpt.read_json(run_dir / CONFIG_FILE, "run config")
    try:
        config = RunConfig.from_dict(raw)
    except CharrnnError as e:
        raise CheckpointError(f"{run_dir / CONFIG_FILE}: {e}") from None
    try:
        text = (run_dir / VOCAB_FILE).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{run_dir / VOCAB_FILE}: missing (vocabulary)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{run_dir / VOCAB_FILE}: unreadable ({e})") from None
    try:
        vocab = Vocab.from_json(text)
    except CharrnnError as e:
        raise CheckpointError(f"{run_dir / VOCAB_FILE}: {e}") from None
    return config, vocab


def config_differences(saved: RunConfig, asked: RunConfig) -> list[str]:
    """Field-by-field differences that make a checkpoint unusable for ``asked``."""
    diffs = []
    for section, fields in (("model", None), ("data", ("docs", "encoding", "val_frac", "labels")),
                            ("train", ("batch_size", "seq_len", "optimizer"))):
        a, b = getattr(saved, section), getattr(asked, section)
        for f in fields or a.__dataclass_fields__:
            if getattr(a, f) != getattr(b, f):
                diffs.append(f"{section}.{f}: run has {getattr(a, f)!r}, asked for {getattr(b, f)!r}")
    return diffs


def vocab_difference(vocab: Vocab, text_chars: list[str]) -> Optional[str]:
    """A message naming the characters of a corpus that a run's vocabulary lacks, or None."""
    missing = [c for c in text_chars if c not in set(vocab.chars)]
    if missing:
        return f"{len(missing)} character(s) missing from the run's vocabulary: {describe_chars(missing)}"
    return None


def read_metrics(run_dir: Path, *, warn: bool = False) -> list[dict]:
    """Every record of ``metrics.jsonl``: a JSON object with an integer ``step``.

    Damaged lines (an unreadable last line from a crash, an edit) are skipped; with ``warn``
    each is logged, so resuming says what it dropped.
    """
    path = Path(run_dir) / METRICS_FILE
    out = []
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return out
    except OSError as e:
        raise CharrnnError(f"cannot read {path}: {e.strerror or e}") from None
    for n, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            rec, why = None, "not JSON"
        else:
            why = ("not a JSON object" if not isinstance(rec, dict) else
                   "its 'step' is not an integer" if not isinstance(rec.get("step"), int)
                   or isinstance(rec.get("step"), bool) else None)
        if why is None:
            out.append(rec)
        elif warn and line.strip():
            log.warning("%s line %d is damaged (%s); skipped", path, n, why)
    return out


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop records after ``step`` (on resume they were written by steps that will be redone)
    and damaged lines (each logged as a warning)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return
    keep = [r for r in read_metrics(run_dir, warn=True) if r["step"] <= step]
    ckpt.atomic_write(path, "".join(json.dumps(r) + "\n" for r in keep))


def append_metrics(run_dir: Path, record: dict) -> None:
    """Append one record to ``metrics.jsonl``."""
    ckpt.append_line(Path(run_dir) / METRICS_FILE, json.dumps(record))


def run_files(run_dir: Path) -> list[Path]:
    """The entries of ``run_dir`` that charrnn wrote for a run (exact names, checkpoint
    directories holding a manifest, charrnn's temporaries); never the marker, the lock or a
    user's own file such as ``notes.txt``, ``.tmp-notes`` or ``ckpt-photos/``."""
    names = {CONFIG_FILE, VOCAB_FILE, METRICS_FILE, TOKENS_FILE, *ckpt.POINTERS}
    checkpoints = set(ckpt.list_checkpoints(run_dir))
    return [p for p in sorted(Path(run_dir).iterdir())
            if p.name in names or _TOKENS_OF_PROCESS.fullmatch(p.name) or ckpt.is_temporary(p.name)
            or p in checkpoints]


def remove_run(run_dir: Path) -> None:
    """Delete the files charrnn wrote for a run (see ``run_files``); everything else is left."""
    for p in run_files(run_dir):
        ckpt._remove_entry(p)


def has_marker(run_dir: Path) -> bool:
    path = Path(run_dir) / MARKER_FILE
    return path.is_file() and not path.is_symlink()


def is_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` is a charrnn run: it holds the marker, or it is one written before the
    marker existed (``config.json``, ``vocab.json`` and a committed checkpoint)."""
    run_dir = Path(run_dir)
    if has_marker(run_dir):
        return True
    return ((run_dir / CONFIG_FILE).is_file() and (run_dir / VOCAB_FILE).is_file()
            and bool(ckpt.list_checkpoints(run_dir)))


def holds_training(run_dir: Path) -> bool:
    """Whether a run directory holds anything training wrote (a config or a checkpoint):
    a marked directory whose start was cut short before that holds nothing to keep."""
    return (Path(run_dir) / CONFIG_FILE).exists() or bool(ckpt.list_checkpoints(run_dir))


def user_entries(run_dir: Path) -> list[str]:
    """Names in a directory that is not a run, other than charrnn's own control files."""
    return sorted(p.name for p in Path(run_dir).iterdir() if p.name not in _CONTROL and not ckpt.is_temporary(p.name))


def check_out_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse an ``--out`` that training must not write into, before anything is written.

    A fresh run goes into a missing or empty directory; ``--overwrite`` also into a charrnn run;
    ``--resume`` needs a run. A directory holding anything else is never written into.
    """
    run_dir = Path(run_dir)
    if run_dir.is_symlink() and not run_dir.exists():
        raise CharrnnError(f"{run_dir} is a broken symbolic link")
    if run_dir.exists() and not run_dir.is_dir():
        raise CharrnnError(f"{run_dir} exists and is not a directory; choose another --out")
    exists = run_dir.is_dir()
    if resume:
        if not exists:
            raise CheckpointError(f"{run_dir}: no such run directory")
        return  # read_run_files names what a run lacks
    if not exists:
        return
    try:
        if is_run(run_dir):
            if holds_training(run_dir) and not overwrite:
                raise CharrnnError(f"{run_dir} already holds a run: pass --resume to continue it, "
                                   f"--overwrite to replace it, or choose another --out")
            return
        others = user_entries(run_dir)
    except OSError as e:
        raise CharrnnError(f"cannot read {run_dir}: {e.strerror or e}") from None
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise CharrnnError(f"{run_dir} is not empty and not a charrnn run (it holds {shown}); charrnn "
                           f"never writes into or deletes from such a directory"
                           + (", even with --overwrite" if overwrite else "") + ": choose another --out")


def write_marker(run_dir: Path) -> None:
    """Mark ``run_dir`` as a charrnn run (done under the lock, before any other run file)."""
    if not has_marker(run_dir):
        ckpt.atomic_write(Path(run_dir) / MARKER_FILE, json.dumps(MARKER) + "\n")


def make_run_dir(run_dir: Path) -> None:
    """Create ``run_dir`` (and its parents): one clear line when that is not allowed."""
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CharrnnError(f"cannot create the run directory {run_dir}: {e.strerror or e}") from None


class RunLock:
    """The exclusive lock of the one process that trains a run (``fcntl.flock``).

    The kernel drops it when the process dies, however it dies, so a killed run never leaves a
    stale lock. The holder's pid is written in the lock file for the refusal message. Readers
    (sample, eval, info, plot) never take it.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: Optional[int] = None

    def __enter__(self) -> "RunLock":
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise CharrnnError(f"{self.path} is a symbolic link; charrnn does not write through links") from None
            raise CharrnnError(f"cannot lock the run directory {self.path.parent}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise CharrnnError(f"{self.path.parent} is being trained by another process (pid {holder}); "
                                   f"wait for it to finish or stop it first") from None
            raise CharrnnError(f"cannot lock the run directory {self.path.parent}: {e.strerror or e}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> bool:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None
        return False


# --- --overwrite: the old run is moved aside, and back if the new one never commits -------

def move_run_aside(run_dir: Path) -> bool:
    """Move the old run's files into ``REPLACED_DIR`` (under the lock). Returns whether any moved."""
    run_dir = Path(run_dir)
    files = run_files(run_dir)
    if not files:
        return False
    aside = run_dir / REPLACED_DIR
    aside.mkdir()
    for p in files:
        os.replace(p, aside / p.name)
    ckpt._fsync_dir(aside)
    ckpt._fsync_dir(run_dir)
    return True


def restore_replaced(run_dir: Path) -> None:
    """Undo ``move_run_aside``: the new run's files go, the old run's come back."""
    run_dir = Path(run_dir)
    aside = run_dir / REPLACED_DIR
    if aside.is_symlink() or not aside.is_dir():
        return
    remove_run(run_dir)
    # ``latest`` last: ``recover`` reads a ``latest`` beside the aside folder as "the new run
    # committed", so it must not come back before everything else has.
    for p in sorted(aside.iterdir(), key=lambda p: (p.name == "latest", p.name in ckpt.POINTERS, p.name)):
        os.replace(p, run_dir / p.name)
    aside.rmdir()
    ckpt._fsync_dir(run_dir)
    log.warning("%s: the run being replaced by --overwrite is restored (the new run never committed)", run_dir)


def discard_replaced(run_dir: Path) -> None:
    """Delete the replaced run, once the new run has committed its first checkpoint."""
    aside = Path(run_dir) / REPLACED_DIR
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)


def recover(run_dir: Path) -> bool:
    """At the start of training (under the lock): finish what a killed run left half done.

    An ``--overwrite`` killed before the new run's first commit gets its old run back (after it,
    the old run is deleted), and charrnn's temporaries are removed. Returns whether an old run
    was restored.
    """
    run_dir = Path(run_dir)
    restored = False
    if (run_dir / REPLACED_DIR).is_dir():
        committed = False
        try:
            target = ckpt.read_pointer(run_dir, "latest")
            committed = target is not None and (run_dir / target).is_dir()
        except CheckpointError:
            pass
        if committed:
            discard_replaced(run_dir)
        else:
            restore_replaced(run_dir)
            restored = True
    ckpt.clean_temporaries(run_dir)
    return restored

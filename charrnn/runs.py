"""Run directories: their config and vocabulary files, and training state to and from checkpoints."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np

from charrnn import checkpoint as ckpt
from charrnn.config import RunConfig
from charrnn.errors import CharrnnError, CheckpointError
from charrnn.vocab import Vocab, describe_chars

log = logging.getLogger(__name__)

CONFIG_FILE, VOCAB_FILE, METRICS_FILE = "config.json", "vocab.json", "metrics.jsonl"
TOKENS_FILE = "tokens.npy"  # the encoded corpus, memory-mapped while training


def _key_name(k) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def flatten(tree, prefix: str) -> dict[str, Any]:
    """``{"prefix/a/b": leaf}`` for every leaf of ``tree``, in a stable order."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join([prefix] + [_key_name(k) for k in path]): leaf for path, leaf in leaves}


def unflatten(template, prefix: str, tensors: dict[str, np.ndarray]):
    """Fill ``template``'s structure with ``tensors`` named as ``flatten`` names them."""
    names = list(flatten(template, prefix))
    treedef = jax.tree_util.tree_structure(template)
    return jax.tree_util.tree_unflatten(treedef, [tensors[n] for n in names])


def expected_shapes(parts: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, dtype)}`` of every leaf of ``{prefix: tree}``, from arrays or shape structs."""
    out = {}
    for prefix, tree in parts.items():
        for name, leaf in flatten(tree, prefix).items():
            out[name] = (tuple(leaf.shape), np.dtype(leaf.dtype).name)
    return out


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
    for section, fields in (("model", None), ("data", ("docs", "encoding", "val_frac")),
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


def read_metrics(run_dir: Path) -> list[dict]:
    """Every record of ``metrics.jsonl`` (an unreadable last line, from a crash, is skipped)."""
    path = Path(run_dir) / METRICS_FILE
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return out
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop records after ``step``: on resume they were written by steps that will be redone."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return
    keep = [r for r in read_metrics(run_dir) if int(r.get("step", 0)) <= step]
    ckpt.atomic_write(path, "".join(json.dumps(r) + "\n" for r in keep))


def append_metrics(run_dir: Path, record: dict) -> None:
    """Append one record to ``metrics.jsonl``."""
    ckpt.append_line(Path(run_dir) / METRICS_FILE, json.dumps(record))


def remove_run(run_dir: Path) -> None:
    """Delete the files of a run (for ``--overwrite``); other files in the directory are left."""
    run_dir = Path(run_dir)
    for p in ckpt.list_checkpoints(run_dir):
        shutil.rmtree(p, ignore_errors=True)
    for name in (CONFIG_FILE, VOCAB_FILE, METRICS_FILE, TOKENS_FILE, *ckpt.POINTERS):
        (run_dir / name).unlink(missing_ok=True)
    ckpt.clean_temporaries(run_dir)

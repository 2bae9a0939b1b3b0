"""Pickle-free checkpoints committed atomically, and loading that validates before it trusts.

A run directory holds ``config.json``, ``vocab.json``, ``metrics.jsonl``, checkpoint
directories ``ckpt-<step>/`` and the pointer files ``latest`` and ``best``. A checkpoint
directory holds ``state.bin`` (named tensors: a JSON header followed by raw little-endian
data), ``meta.json`` (step, data position, losses) and ``manifest.json`` (format version and
the SHA-256 and size of the other two). It is written under a temporary name, fsynced, renamed
into place and the run directory fsynced; only then do the pointers move, and only after that
are old checkpoints removed. A crash therefore leaves the old or the new checkpoint, never half.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import shutil
import struct
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from charrnn.errors import CharrnnError, CheckpointError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MAGIC = b"CHRNNT01"
MAX_HEADER_BYTES = 16 << 20
STATE_FILE, META_FILE, MANIFEST_FILE = "state.bin", "meta.json", "manifest.json"
MAX_JSON_BYTES = 16 << 20
TMP_PREFIX = ".tmp-"
POINTERS = ("latest", "best")
# Only plain numeric dtypes may be stored: nothing that could carry objects or code.
DTYPES = {"float32": np.dtype("<f4"), "int32": np.dtype("<i4"), "uint32": np.dtype("<u4"),
          "float64": np.dtype("<f8"), "int64": np.dtype("<i8"), "bool": np.dtype("bool")}


_fault_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Crash-test hook: ``CHARRNN_FAULT=name@n`` SIGKILLs this process the n-th time ``name`` is
    reached, so tests can kill a run at exact moments inside a save. Inert otherwise."""
    spec = os.environ.get("CHARRNN_FAULT")
    if not spec or not spec.startswith(name + "@"):
        return
    _fault_hits[name] = _fault_hits.get(name, 0) + 1
    if _fault_hits[name] == int(spec.split("@", 1)[1]):
        os.kill(os.getpid(), 9)


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:08d}"


# --- low-level atomic writes -------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _disk_error(e: OSError, path: Path) -> CharrnnError:
    if e.errno == errno.ENOSPC:
        return CharrnnError(f"no space left on device while writing {path}; the previous checkpoint is intact")
    return CharrnnError(f"cannot write {path}: {e.strerror or e}")


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write ``path`` via a temporary file, fsync and rename, so readers see old or new, never half."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}")
    try:
        _write_file(tmp, data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _disk_error(e, path) from None
    _fsync_dir(path.parent)


def append_line(path: Path, line: str) -> None:
    """Append one line to a log file (``metrics.jsonl``), flushed to disk."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line.rstrip("\n") + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise _disk_error(e, path) from None


# --- tensor container --------------------------------------------------------------------

def encode_tensors(tensors: Mapping[str, np.ndarray]) -> bytes:
    """Serialise named arrays: magic, 8-byte header length, JSON header, raw data."""
    entries, chunks, offset = {}, [], 0
    for name, arr in tensors.items():
        arr = np.asarray(arr)
        dname = arr.dtype.name
        if dname not in DTYPES:
            raise ValueError(f"tensor {name}: dtype {dname} cannot be stored")
        data = np.ascontiguousarray(arr, dtype=DTYPES[dname]).tobytes()
        entries[name] = {"dtype": dname, "shape": list(arr.shape), "offset": offset, "nbytes": len(data)}
        chunks.append(data)
        offset += len(data)
    header = json.dumps({"tensors": entries}, sort_keys=True).encode("utf-8")
    return MAGIC + struct.pack("<Q", len(header)) + header + b"".join(chunks)


def decode_tensors(path: Path, expected: Optional[Mapping[str, tuple[tuple[int, ...], str]]] = None,
                   *, check_finite: bool = True, partial: bool = False) -> dict[str, np.ndarray]:
    """Read named arrays from ``path``, validating every declared size before allocating.

    Args:
        path: a ``state.bin`` file.
        expected: ``{name: (shape, dtype name)}`` the file must hold exactly, or None.
        check_finite: refuse NaN or infinite floating-point values.
        partial: the file may hold more tensors than ``expected``; only those are returned
            (the others' headers are still validated).

    Raises:
        CheckpointError: naming the file and the offending field.
    """
    where = str(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(len(MAGIC) + 8)
            if len(head) < len(MAGIC) + 8 or head[:len(MAGIC)] != MAGIC:
                raise CheckpointError(f"{where}: not a charrnn tensor file (bad magic or truncated header)")
            (hlen,) = struct.unpack("<Q", head[len(MAGIC):])
            if hlen > MAX_HEADER_BYTES or len(head) + hlen > size:
                raise CheckpointError(f"{where}: header length {hlen} exceeds the file size {size}")
            try:
                header = json.loads(f.read(hlen).decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError) as e:
                raise CheckpointError(f"{where}: header is not valid JSON ({e})") from None
            base = len(head) + hlen
            if not isinstance(header, dict) or not isinstance(header.get("tensors"), dict):
                raise CheckpointError(f"{where}: header field 'tensors' is missing")
            entries = header["tensors"]
            if expected is not None:
                missing = sorted(set(expected) - set(entries))
                extra = sorted(set(entries) - set(expected))
                if missing:
                    raise CheckpointError(f"{where}: tensor(s) missing: {', '.join(missing[:5])}")
                if extra and not partial:
                    raise CheckpointError(f"{where}: unexpected tensor(s): {', '.join(extra[:5])}")
            out = {}
            end_of_data = base
            for name, e in entries.items():
                wanted = expected is None or name in expected
                arr = _read_entry(f, where, name, e, base, size, load=wanted)
                end_of_data = max(end_of_data, base + e["offset"] + e["nbytes"])
                if not wanted:
                    continue
                if expected is not None:
                    shape, dtype = expected[name]
                    if tuple(arr.shape) != tuple(shape) or arr.dtype.name != dtype:
                        raise CheckpointError(
                            f"{where}: tensor {name} has shape {list(arr.shape)} {arr.dtype.name}, "
                            f"the config needs {list(shape)} {dtype}")
                if check_finite and arr.dtype.kind == "f" and not np.isfinite(arr).all():
                    raise CheckpointError(f"{where}: tensor {name} holds NaN or infinite values")
                out[name] = arr
            if end_of_data != size:
                raise CheckpointError(f"{where}: {size - end_of_data} trailing bytes after the last tensor")
            return out
    except CheckpointError:
        raise
    except (OSError, ValueError, TypeError, KeyError, OverflowError, struct.error, MemoryError,
            RecursionError) as e:
        raise CheckpointError(f"{where}: cannot read ({type(e).__name__}: {e})") from None


def _read_entry(f, where, name, e, base, size, load: bool = True) -> Optional[np.ndarray]:
    if not isinstance(e, dict):
        raise CheckpointError(f"{where}: tensor {name}: entry is not an object")
    dtype, shape, offset, nbytes = e.get("dtype"), e.get("shape"), e.get("offset"), e.get("nbytes")
    if dtype not in DTYPES:
        raise CheckpointError(f"{where}: tensor {name}: field 'dtype' is {dtype!r}, not a stored dtype")
    if (not isinstance(shape, list) or len(shape) > 8
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2 ** 40 for d in shape)):
        raise CheckpointError(f"{where}: tensor {name}: field 'shape' is invalid: {shape!r}")
    for field, v in (("offset", offset), ("nbytes", nbytes)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise CheckpointError(f"{where}: tensor {name}: field '{field}' is invalid: {v!r}")
    want = math.prod(shape) * DTYPES[dtype].itemsize
    if nbytes != want:
        raise CheckpointError(f"{where}: tensor {name}: field 'nbytes' is {nbytes}, shape {shape} needs {want}")
    if base + offset + nbytes > size:
        raise CheckpointError(
            f"{where}: tensor {name}: declares bytes {offset}..{offset + nbytes} past the end of the file")
    if not load:
        return None
    f.seek(base + offset)
    data = f.read(nbytes)
    if len(data) != nbytes:
        raise CheckpointError(f"{where}: tensor {name}: truncated")
    return np.frombuffer(data, dtype=DTYPES[dtype]).reshape(shape).copy()


# --- checkpoint directories --------------------------------------------------------------

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_json(path: Path, what: str) -> Any:
    """Parse a small JSON file; raises ``CheckpointError`` naming it when it is missing or bad."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise CheckpointError(f"{path}: {size} bytes is too large for {what}")
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing ({what})") from None
    except CheckpointError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: {what} is not valid JSON ({type(e).__name__}: {e})") from None


def write_checkpoint(run_dir: Path, step: int, tensors: Mapping[str, np.ndarray], meta: dict) -> Path:
    """Commit one checkpoint directory atomically and return its path.

    Raises:
        CharrnnError: when the disk is full or not writable; nothing partial is left behind.
    """
    run_dir = Path(run_dir)
    name = checkpoint_name(step)
    final = run_dir / name
    tmp = run_dir / f"{TMP_PREFIX}{name}-{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        state = encode_tensors(tensors)
        meta_bytes = json.dumps(meta, indent=1, sort_keys=True).encode("utf-8")
        _write_file(tmp / STATE_FILE, state)
        fault_point("save-state-written")
        _write_file(tmp / META_FILE, meta_bytes)
        manifest = {
            "format": "charrnn-checkpoint", "version": FORMAT_VERSION,
            "files": {STATE_FILE: {"sha256": hashlib.sha256(state).hexdigest(), "size": len(state)},
                      META_FILE: {"sha256": hashlib.sha256(meta_bytes).hexdigest(), "size": len(meta_bytes)}},
        }
        _write_file(tmp / MANIFEST_FILE, json.dumps(manifest, indent=1, sort_keys=True).encode("utf-8"))
        _fsync_dir(tmp)
        fault_point("save-before-rename")
        if final.exists():
            # Same step saved again (e.g. after a resume): move the old one aside first.
            old = run_dir / f"{TMP_PREFIX}old-{name}-{os.getpid()}"
            os.replace(final, old)
            fault_point("save-between-renames")
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(run_dir)
        fault_point("save-renamed")
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _disk_error(e, final) from None
    return final


def set_pointer(run_dir: Path, pointer: str, target: str) -> None:
    atomic_write(Path(run_dir) / pointer, target + "\n")


def read_pointer(run_dir: Path, pointer: str) -> Optional[str]:
    path = Path(run_dir) / pointer
    try:
        target = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable pointer ({e})") from None
    if not target.startswith("ckpt-") or "/" in target or "\\" in target or len(target) > 64:
        raise CheckpointError(f"{path}: pointer names {target[:64]!r}, not a checkpoint")
    return target


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Committed checkpoint directories, oldest first."""
    return sorted(p for p in Path(run_dir).glob("ckpt-*") if p.is_dir())


def clean_temporaries(run_dir: Path) -> int:
    """Remove leftovers of interrupted saves; returns how many were removed.

    A checkpoint moved aside to be replaced (``.tmp-old-ckpt-N-PID``) whose replacement never
    arrived is moved back instead.
    """
    n = 0
    for p in Path(run_dir).glob(f"{TMP_PREFIX}*"):
        if p.name.startswith(f"{TMP_PREFIX}old-ckpt-"):
            original = Path(run_dir) / p.name[len(f"{TMP_PREFIX}old-"):].rsplit("-", 1)[0]
            if not original.exists():
                os.replace(p, original)
                continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        n += 1
    return n


def prune(run_dir: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints, never the ones ``latest`` or ``best`` name."""
    protected = {read_pointer(run_dir, p) for p in POINTERS}
    ckpts = list_checkpoints(run_dir)
    for p in ckpts[:max(0, len(ckpts) - keep)]:
        if p.name not in protected:
            shutil.rmtree(p, ignore_errors=True)


def resolve(run: Path, which: str = "latest") -> Path:
    """The checkpoint directory for ``run``: a run directory (with pointer ``which``) or a ckpt dir."""
    run = Path(run)
    if (run / MANIFEST_FILE).is_file():
        return run
    if not run.is_dir():
        raise CheckpointError(f"{run}: no such run directory")
    target = None
    for _ in range(10):
        previous = target
        target = read_pointer(run, which)
        if target is None and which == "best":
            target = read_pointer(run, "latest")
        if target is None:
            raise CheckpointError(f"{run}: holds no checkpoint (no '{which}' pointer); train it first")
        path = run / target
        if path.is_dir():
            return path
        # A run being trained with a small --keep may commit a newer checkpoint and retire this
        # one between our reading the pointer and looking: only a pointer that still names a
        # missing directory when read again is broken.
        if target == previous:
            break
    raise CheckpointError(f"{run / which}: names {target}, which does not exist")


def read_checkpoint(path: Path, expected: Optional[Mapping[str, tuple[tuple[int, ...], str]]] = None,
                    *, partial: bool = False) -> tuple[dict[str, np.ndarray], dict]:
    """Verify a checkpoint directory's manifest, then read its tensors and metadata.

    Raises:
        CheckpointError: for any missing, altered, truncated or inconsistent file.
    """
    path = Path(path)
    manifest = read_json(path / MANIFEST_FILE, "manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != "charrnn-checkpoint":
        raise CheckpointError(f"{path / MANIFEST_FILE}: field 'format' is not 'charrnn-checkpoint'")
    version = manifest.get("version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path / MANIFEST_FILE}: field 'version' is {version!r}; this charrnn reads version {FORMAT_VERSION}"
            + (" (written by a newer charrnn: upgrade)" if isinstance(version, int) and version > FORMAT_VERSION
               else ""))
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) != {STATE_FILE, META_FILE}:
        raise CheckpointError(f"{path / MANIFEST_FILE}: field 'files' must list {STATE_FILE} and {META_FILE}")
    for fname, entry in files.items():
        fpath = path / fname
        if not isinstance(entry, dict):
            raise CheckpointError(f"{path / MANIFEST_FILE}: files.{fname} is not an object")
        try:
            size = fpath.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"{fpath}: missing") from None
        except OSError as e:
            raise CheckpointError(f"{fpath}: cannot read ({e})") from None
        if size != entry.get("size"):
            raise CheckpointError(f"{fpath}: size {size} does not match the manifest's {entry.get('size')!r}")
        try:
            digest = _sha256(fpath)
        except OSError as e:
            raise CheckpointError(f"{fpath}: cannot read ({e})") from None
        if digest != entry.get("sha256"):
            raise CheckpointError(f"{fpath}: SHA-256 does not match the manifest (file altered or corrupt)")
    meta = read_json(path / META_FILE, "checkpoint metadata")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path / META_FILE}: expected a JSON object")
    tensors = decode_tensors(path / STATE_FILE, expected, partial=partial)
    return tensors, meta

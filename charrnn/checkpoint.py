"""Pickle-free checkpoints committed atomically, and loading that validates before it trusts.

The one home of checkpoint logic: the tensor container, atomic commits, pointers, training
state <-> named tensors, fine-tuning's weight transplant, and reading a run that is being trained.

A run directory (see ``charrnn.runs``: its marker and lock) holds ``config.json``,
``vocab.json``, ``metrics.jsonl``, checkpoint directories ``ckpt-<step>/`` and the pointer
files ``latest`` and ``best``. A checkpoint directory holds ``state.safetensors`` (named
tensors in the safetensors format; version-1 checkpoints hold ``state.bin`` instead, still
read), ``meta.json`` (step, data position, losses) and ``manifest.json`` (format version and
the SHA-256 and size of the other two). It is written under a temporary name, fsynced, renamed
into place and the run directory fsynced; only then do the pointers move, and only after that
are old checkpoints removed. A crash therefore leaves the old or the new checkpoint, never half.
Every temporary is named ``TMP_PREFIX...`` so that cleaning up never touches a user's file;
nothing is written through a symbolic link, and no tensor holding NaN or inf is ever committed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from charrnn.errors import CharrnnError, CheckpointError
from charrnn.vocab import NUM_SPECIAL

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
MAX_HEADER_BYTES = 16 << 20
STATE_FILE, META_FILE, MANIFEST_FILE = "state.safetensors", "meta.json", "manifest.json"
# Version-1 checkpoints (read, never written) hold ``state.bin``: this magic, a JSON header, data.
LEGACY_STATE_FILE, MAGIC = "state.bin", b"CHRNNT01"
MAX_JSON_BYTES = 16 << 20
# Every temporary charrnn writes in a run directory starts with this, so cleaning up can never
# take a user's own file (a ``.tmp-notes``); temporaries of older versions match _LEGACY_TMP.
TMP_PREFIX = ".charrnn-tmp-"
_LEGACY_TMP = re.compile(r"\.tmp2?-(?:old-)?(?:ckpt-\d{8,}|config\.json|vocab\.json|metrics\.jsonl|latest|best"
                         r"|tokens(?:-p\d+)?\.npy)-\d+")
CHECKPOINT_NAME = re.compile(r"ckpt-\d{8,}")
POINTERS = ("latest", "best")
# Only plain numeric dtypes may be stored: nothing that could carry objects or code.
DTYPES = {"float32": np.dtype("<f4"), "int32": np.dtype("<i4"), "uint32": np.dtype("<u4"),
          "float64": np.dtype("<f8"), "int64": np.dtype("<i8"), "bool": np.dtype("bool")}
# The same dtypes by their safetensors names (a header's "dtype" field).
SAFETENSORS_DTYPES = {"F32": "float32", "F64": "float64", "I32": "int32", "I64": "int64", "U32": "uint32",
                      "BOOL": "bool"}


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


def open_new(path: Path, mode: str = "wb"):
    """Open a fresh file for writing, never through a symbolic link: one left at a temporary's
    name is removed (the link itself, not what it names) and the file is created exclusively."""
    path = Path(path)
    if path.is_symlink():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    return os.fdopen(fd, mode)


def _write_file(path: Path, data: bytes) -> None:
    with open_new(path) as f:
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
        tmp.unlink(missing_ok=True)
        _write_file(tmp, data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _disk_error(e, path) from None
    _fsync_dir(path.parent)


def append_line(path: Path, line: str) -> None:
    """Append one line to a log file (``metrics.jsonl``), flushed to disk; never through a link."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "a", encoding="utf-8") as f:
            f.write(line.rstrip("\n") + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CharrnnError(f"{path} is a symbolic link; charrnn does not write through links") from None
        raise _disk_error(e, path) from None


# --- tensor container --------------------------------------------------------------------

def encode_tensors(tensors: Mapping[str, np.ndarray]) -> bytes:
    """Serialise named arrays as a safetensors file (the format the rest of the ecosystem reads).

    Raises:
        ValueError: for a dtype outside ``DTYPES`` (nothing that could carry objects or code).
    """
    arrays = {}
    for name, arr in tensors.items():
        arr = np.asarray(arr)
        dname = arr.dtype.name
        if dname not in DTYPES:
            raise ValueError(f"tensor {name}: dtype {dname} cannot be stored")
        # reshape: ascontiguousarray makes a 0-d array (a step count) 1-d.
        arrays[name] = np.ascontiguousarray(arr, dtype=DTYPES[dname]).reshape(arr.shape)
    return safetensors.numpy.save(arrays)


def decode_tensors(path: Path, expected: Optional[Mapping[str, tuple[tuple[int, ...], str]]] = None,
                   *, check_finite: bool = True, partial: bool = False) -> dict[str, np.ndarray]:
    """Read named arrays from a safetensors file, validating its header before the library sees it.

    Memory stays bounded by the file's size: every declared length and offset is checked against
    the bytes actually present before anything is allocated for it.

    Args:
        path: a ``state.safetensors`` file.
        expected: ``{name: (shape, dtype name)}`` the file must hold exactly, or None.
        check_finite: refuse NaN or infinite floating-point values.
        partial: the file may hold more tensors than ``expected``; only those are returned
            (the others' headers are still validated).

    Raises:
        CheckpointError: naming the file and the offending field.
    """
    where = str(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(size + 1)
        if len(raw) != size:
            raise CheckpointError(f"{where}: changed size while being read")
        entries = _safetensors_header(raw, where)
        _check_names(where, entries, expected, partial)
        try:
            loaded = safetensors.numpy.load(raw)
        except safetensors.SafetensorError as e:  # validated above: the library and we disagree
            raise CheckpointError(f"{where}: not a readable safetensors file ({e})") from None
        del raw
        return {name: _checked(where, name, arr, expected, check_finite)
                for name, arr in loaded.items() if expected is None or name in expected}
    except CheckpointError:
        raise
    except (OSError, ValueError, TypeError, KeyError, OverflowError, struct.error, MemoryError,
            RecursionError) as e:
        raise CheckpointError(f"{where}: cannot read ({type(e).__name__}: {e})") from None


def _safetensors_header(raw: bytes, where: str) -> dict[str, tuple[str, list[int], int, int]]:
    """``{name: (safetensors dtype, shape, begin, end)}`` from a safetensors file's header, after
    checking everything the format promises: a bounded header inside the file, a JSON object,
    stored dtypes only, each entry's bytes matching its shape, entries tiling the data exactly."""
    if len(raw) < 8:
        raise CheckpointError(f"{where}: not a safetensors file ({len(raw)} bytes, shorter than the "
                              f"8-byte header length)")
    (hlen,) = struct.unpack_from("<Q", raw)
    if hlen > MAX_HEADER_BYTES or 8 + hlen > len(raw):
        raise CheckpointError(f"{where}: header length {hlen} exceeds the file size {len(raw)}"
                              + (f" or the limit {MAX_HEADER_BYTES}" if hlen > MAX_HEADER_BYTES else ""))

    def unique(pairs):
        names = [k for k, _ in pairs]
        if len(set(names)) != len(names):
            twice = sorted({k for k in names if names.count(k) > 1})
            raise CheckpointError(f"{where}: header names {', '.join(map(repr, twice[:5]))} more than once")
        return dict(pairs)

    try:
        header = json.loads(raw[8:8 + hlen].decode("utf-8"), object_pairs_hook=unique)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{where}: header is not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(f"{where}: field '__metadata__' must be an object of strings")
    data_len = len(raw) - 8 - hlen
    entries = {name: _read_entry(where, name, e, data_len) for name, e in header.items()}
    # The tensors must tile the data section: no overlap (two tensors sharing bytes), no gap, no tail.
    end = 0
    for name, (_, _, begin, stop) in sorted(entries.items(), key=lambda kv: kv[1][2:]):
        if begin != end:
            raise CheckpointError(
                f"{where}: tensor {name}: field 'data_offsets' starts at {begin}, "
                + (f"inside the tensor before it (ending at {end})" if begin < end
                   else f"leaving bytes {end}..{begin} unused"))
        end = stop
    if end != data_len:
        raise CheckpointError(f"{where}: {data_len - end} trailing bytes after the last tensor")
    return entries


def _is_index(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _read_entry(where: str, name: str, e, data_len: int) -> tuple[str, list[int], int, int]:
    """One safetensors header entry as ``(dtype, shape, begin, end)``, each field checked."""
    if not isinstance(e, dict):
        raise CheckpointError(f"{where}: tensor {name}: entry is not an object")
    dtype, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{where}: tensor {name}: field 'dtype' is {repr(dtype)[:40]}, not a stored dtype "
                              f"({', '.join(SAFETENSORS_DTYPES)})")
    if (not isinstance(shape, list) or len(shape) > 8
            or not all(_is_index(d) and d < 2 ** 40 for d in shape)):
        raise CheckpointError(f"{where}: tensor {name}: field 'shape' is invalid: {str(shape)[:80]}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_index, offsets))
            and offsets[0] <= offsets[1]):
        raise CheckpointError(f"{where}: tensor {name}: field 'data_offsets' is invalid: {str(offsets)[:80]}")
    begin, end = offsets
    want = math.prod(shape) * DTYPES[SAFETENSORS_DTYPES[dtype]].itemsize
    if end - begin != want:
        raise CheckpointError(f"{where}: tensor {name}: field 'data_offsets' {offsets} spans {end - begin} bytes, "
                              f"field 'shape' {shape} of {dtype} needs {want}")
    if end > data_len:
        raise CheckpointError(f"{where}: tensor {name}: field 'data_offsets' {offsets} reaches past the end of "
                              f"the data ({data_len} bytes)")
    return dtype, shape, begin, end


def _check_names(where: str, names, expected, partial: bool) -> None:
    if expected is None:
        return
    missing = sorted(set(expected) - set(names))
    extra = sorted(set(names) - set(expected))
    if missing:
        raise CheckpointError(f"{where}: tensor(s) missing: {', '.join(missing[:5])}")
    if extra and not partial:
        raise CheckpointError(f"{where}: unexpected tensor(s): {', '.join(extra[:5])}")


def _checked(where: str, name: str, arr: np.ndarray, expected, check_finite: bool) -> np.ndarray:
    """``arr`` if it has the shape and dtype ``expected`` names (when given) and, for floats, is finite."""
    if expected is not None:
        shape, dtype = expected[name]
        if tuple(arr.shape) != tuple(shape) or arr.dtype.name != dtype:
            raise CheckpointError(
                f"{where}: tensor {name} has shape {list(arr.shape)} {arr.dtype.name}, "
                f"the config needs {list(shape)} {dtype}")
    if check_finite and arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise CheckpointError(f"{where}: tensor {name} holds NaN or infinite values")
    return arr


def _decode_chrnnt01(path: Path, expected: Optional[Mapping[str, tuple[tuple[int, ...], str]]] = None,
                     *, check_finite: bool = True, partial: bool = False) -> dict[str, np.ndarray]:
    """``decode_tensors`` for version-1 checkpoints' ``state.bin``: magic ``CHRNNT01``, an 8-byte
    header length, a JSON header ``{"tensors": {name: {dtype, shape, offset, nbytes}}}``, raw data."""
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
            _check_names(where, entries, expected, partial)
            out = {}
            end_of_data = base
            for name, e in entries.items():
                wanted = expected is None or name in expected
                arr = _read_chrnnt01_entry(f, where, name, e, base, size, load=wanted)
                end_of_data = max(end_of_data, base + e["offset"] + e["nbytes"])
                if wanted:
                    out[name] = _checked(where, name, arr, expected, check_finite)
            if end_of_data != size:
                raise CheckpointError(f"{where}: {size - end_of_data} trailing bytes after the last tensor")
            return out
    except CheckpointError:
        raise
    except (OSError, ValueError, TypeError, KeyError, OverflowError, struct.error, MemoryError,
            RecursionError) as e:
        raise CheckpointError(f"{where}: cannot read ({type(e).__name__}: {e})") from None


def _read_chrnnt01_entry(f, where, name, e, base, size, load: bool = True) -> Optional[np.ndarray]:
    if not isinstance(e, dict):
        raise CheckpointError(f"{where}: tensor {name}: entry is not an object")
    dtype, shape, offset, nbytes = e.get("dtype"), e.get("shape"), e.get("offset"), e.get("nbytes")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CheckpointError(f"{where}: tensor {name}: field 'dtype' is {dtype!r}, not a stored dtype")
    if (not isinstance(shape, list) or len(shape) > 8
            or not all(_is_index(d) and d < 2 ** 40 for d in shape)):
        raise CheckpointError(f"{where}: tensor {name}: field 'shape' is invalid: {shape!r}")
    for field, v in (("offset", offset), ("nbytes", nbytes)):
        if not _is_index(v):
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


# Manifest version -> (tensor file, its reader). Version 1 is read, never written.
_STATE_READERS = {1: (LEGACY_STATE_FILE, _decode_chrnnt01), FORMAT_VERSION: (STATE_FILE, decode_tensors)}


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
    for tname, arr in tensors.items():
        arr = np.asarray(arr)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise CharrnnError(f"refusing to save step {step} to {final}: tensor {tname} holds NaN or "
                               f"infinite values")
    if final.is_symlink():
        raise CharrnnError(f"{final} is a symbolic link; charrnn does not write through links")
    try:
        _remove_entry(tmp)
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
            _remove_entry(old)
            os.replace(final, old)
            fault_point("save-between-renames")
            os.replace(tmp, final)
            _remove_entry(old)
        else:
            os.replace(tmp, final)
        _fsync_dir(run_dir)
        fault_point("save-renamed")
    except OSError as e:
        _remove_entry(tmp)
        raise _disk_error(e, final) from None
    return final


def _remove_entry(path: Path) -> None:
    """Remove a file, a symbolic link (never what it names) or a directory tree, if present."""
    try:
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path, ignore_errors=True)
    except OSError:
        pass


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
    """Committed checkpoint directories (``ckpt-<step>`` holding a manifest; never a symbolic
    link or a user's ``ckpt-photos/``), oldest first."""
    return sorted(p for p in Path(run_dir).glob("ckpt-*")
                  if CHECKPOINT_NAME.fullmatch(p.name) and not p.is_symlink() and p.is_dir()
                  and (p / MANIFEST_FILE).is_file())


def is_temporary(name: str) -> bool:
    """Whether ``name`` is one of charrnn's own temporaries (this version's or an older one's)."""
    return name.startswith(TMP_PREFIX) or bool(_LEGACY_TMP.fullmatch(name))


def clean_temporaries(run_dir: Path) -> int:
    """Remove leftovers of interrupted writes; returns how many were removed.

    Only charrnn's own temporaries are touched. Call it only while holding the run's lock
    (``runs.RunLock``): then no live writer owns them. A checkpoint moved aside to be replaced
    (``<TMP_PREFIX>old-ckpt-N-PID``) whose replacement never arrived is moved back instead.
    """
    n = 0
    for p in sorted(Path(run_dir).iterdir()):
        if not is_temporary(p.name):
            continue
        for prefix in (f"{TMP_PREFIX}old-", ".tmp-old-"):
            if p.name.startswith(prefix) and not p.is_symlink() and p.is_dir():
                original = Path(run_dir) / p.name[len(prefix):].rsplit("-", 1)[0]
                if CHECKPOINT_NAME.fullmatch(original.name) and not os.path.lexists(original):
                    os.replace(p, original)
                    break
        else:
            _remove_entry(p)
            n += 1
    return n


def prune(run_dir: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints, never the ones ``latest`` or ``best`` name."""
    protected = {read_pointer(run_dir, p) for p in POINTERS}
    ckpts = list_checkpoints(run_dir)
    for p in ckpts[:max(0, len(ckpts) - keep)]:
        if p.name not in protected:
            _remove_entry(p)


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
    if type(version) is not int or version not in _STATE_READERS:  # type(): True == 1 is no version
        raise CheckpointError(
            f"{path / MANIFEST_FILE}: field 'version' is {version!r}; this charrnn reads versions "
            f"{' and '.join(map(str, _STATE_READERS))}"
            + (" (written by a newer charrnn: upgrade)" if isinstance(version, int) and version > FORMAT_VERSION
               else ""))
    state_file, decode = _STATE_READERS[version]
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) != {state_file, META_FILE}:
        raise CheckpointError(f"{path / MANIFEST_FILE}: field 'files' must list {state_file} and {META_FILE}")
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
    tensors = decode(path / state_file, expected, partial=partial)
    return tensors, meta


# --- training state <-> named tensors ------------------------------------------------------

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


def checkpoint_parts(state, carry) -> dict[str, Any]:
    """What a checkpoint holds, by tensor-name prefix (one list for saving and loading)."""
    return {"params": state.params, "opt": state.opt_state, "carry": carry, "step": state.step, "rng": state.rng}


def train_state_tensors(state, carry) -> dict[str, Any]:
    """The named arrays a checkpoint holds for a ``train.TrainState`` and carry (still on device)."""
    named = {}
    for prefix, tree in checkpoint_parts(state, carry).items():
        named.update(flatten(tree, prefix))
    return named


def save_train_state(run_dir: Path, state, carry, meta: dict) -> Path:
    """Commit ``state`` and ``carry`` as checkpoint ``ckpt-<step>`` in ``run_dir`` (one process)."""
    return write_checkpoint(run_dir, int(meta["step"]), jax.device_get(train_state_tensors(state, carry)), meta)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_val(v) -> bool:
    return (isinstance(v, dict) and all(_is_number(v.get(k)) for k in ("nats", "bits"))
            and _is_int(v.get("chars", 0)))


# meta.json fields training reads back, and what each must be (a missing one takes its default).
_META_FIELDS = {
    "step": ("a non-negative integer", lambda v: _is_int(v) and v >= 0),
    "epoch": ("a non-negative integer", lambda v: _is_int(v) and v >= 0),
    "window": ("a non-negative integer", lambda v: _is_int(v) and v >= 0),
    "chars_seen": ("a non-negative integer", lambda v: _is_int(v) and v >= 0),
    "corpus_sha256": ("a string", lambda v: isinstance(v, str)),
    "best_val": ("a finite number or null", lambda v: v is None or _is_number(v)),
    "best_step": ("a non-negative integer or null", lambda v: v is None or (_is_int(v) and v >= 0)),
    "evals_since_best": ("a non-negative integer", lambda v: _is_int(v) and v >= 0),
    "bad_in_a_row": ("a non-negative integer", lambda v: _is_int(v) and v >= 0),
    "bad_total": ("a non-negative integer", lambda v: _is_int(v) and v >= 0),
    "log_losses": ("a list of finite numbers", lambda v: isinstance(v, list) and all(map(_is_number, v))),
    "last_val": ("null or an object with finite nats and bits", lambda v: v is None or _is_val(v)),
}


def check_train_meta(meta: dict, where: Path) -> dict:
    """``meta`` if every field training reads back has its type; else ``CheckpointError``
    naming the file and the field."""
    if not _is_int(meta.get("step")):
        raise CheckpointError(f"{where}: field 'step' must be a non-negative integer, not {meta.get('step')!r}")
    for field, (what, ok) in _META_FIELDS.items():
        if field in meta and not ok(meta[field]):
            raise CheckpointError(f"{where}: field '{field}' must be {what}, not {str(meta[field])[:80]}")
    return meta


def load_train_state(run_dir: Path, template, carry_template, which: str = "latest"):
    """Restore ``(state, carry, meta)`` from a run's checkpoint, validated against the templates.

    ``template`` is a ``train.TrainState`` (arrays or shape structs) the restored one copies.
    """
    parts = checkpoint_parts(template, carry_template)
    path = resolve(run_dir, which)
    tensors, meta = read_checkpoint(path, expected_shapes(parts))
    check_train_meta(meta, path / META_FILE)
    restored = {k: unflatten(v, k, tensors) for k, v in parts.items()}
    if meta["step"] != int(restored["step"]):
        raise CheckpointError(f"{path / META_FILE}: field 'step' does not match the saved state")
    as_jax = lambda t: jax.tree_util.tree_map(jnp.asarray, t)  # noqa: E731
    state = template._replace(params=as_jax(restored["params"]), opt_state=as_jax(restored["opt"]),
                              step=jnp.asarray(restored["step"]), rng=jnp.asarray(restored["rng"]))
    return state, as_jax(restored["carry"]), meta


def read_params(run: Path, which: str, params_template) -> tuple[Path, Any, dict]:
    """``(checkpoint dir, parameters as numpy, meta)`` of a run's ``which`` checkpoint.

    A run being trained may commit a newer checkpoint and retire this one while we read it: if
    the pointer moved on, the new one is read instead (a few times at most).
    """
    ck_dir = resolve(run, which)
    expected = expected_shapes({"params": params_template})
    for attempt in range(10):
        try:
            tensors, meta = read_checkpoint(ck_dir, expected, partial=True)
            break
        except CheckpointError:
            newer = resolve(run, which)
            if attempt == 9 or newer == ck_dir:
                raise
            ck_dir = newer
    return ck_dir, unflatten(params_template, "params", tensors), meta


def transplant(source_params, target_params, source_vocab_size: int):
    """``target_params`` with every weight copied from ``source_params`` (fine-tuning).

    Tensors whose vocabulary axis grew (the first layer's input rows, the output columns) get
    the source's rows for the old ids and keep their fresh initialisation for the new ones,
    except the output bias of a new character: it starts at the source's lowest output bias,
    as likely as the rarest known character, so the model's loss on old text is where the
    source run ended instead of paying for characters it has never seen.
    """
    src = flatten(source_params, "p")
    out = {}
    for name, t in flatten(target_params, "p").items():
        s = np.asarray(src[name])
        t = np.array(t)
        if s.shape == t.shape:
            t = s
        elif s.ndim == t.ndim and s.shape[0] == source_vocab_size and s.shape[1:] == t.shape[1:]:
            t[:source_vocab_size] = s
        elif s.ndim == t.ndim and s.shape[-1] == source_vocab_size and s.shape[:-1] == t.shape[:-1]:
            t[..., :source_vocab_size] = s
        else:
            raise CharrnnError(f"cannot fine-tune: parameter {name[2:]} has shape {list(s.shape)} in the source "
                               f"run and {list(t.shape)} here")
        if name == "p/b_out" and t.shape[0] > source_vocab_size:
            t[source_vocab_size:] = s[NUM_SPECIAL:].min()
        out[name] = jnp.asarray(t)
    return unflatten(target_params, "p", out)

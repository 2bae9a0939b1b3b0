"""A corpus of malformed checkpoints: each must raise CheckpointError naming the file, run no code,
and use memory bounded by the file's size."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import charrnn
from charrnn import checkpoint as ckpt
from charrnn.config import ModelConfig, RunConfig, TrainConfig

PWNED = Path("/tmp/charrnn-pickle-bomb-ran")
# A pickle that would run a shell command if anything unpickled it.
PICKLE_BOMB = b"cos\nsystem\n(S'touch " + str(PWNED).encode() + b"'\ntR."


@pytest.fixture(scope="module")
def valid_run(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("valid")
    (d / "c.txt").write_text("hello world, hello checkpoints. " * 20, encoding="utf-8")
    config = RunConfig(model=ModelConfig(hidden=8, layers=1), train=TrainConfig(batch_size=2, seq_len=8, max_steps=2))
    return charrnn.train(str(d / "c.txt"), config, out=d / "run").run_dir


def _resign(ck: Path) -> None:
    """Recompute the manifest so the damage reaches the parsers behind the checksum."""
    manifest = json.loads((ck / ckpt.MANIFEST_FILE).read_text())
    for name in manifest["files"]:
        data = (ck / name).read_bytes()
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (ck / ckpt.MANIFEST_FILE).write_text(json.dumps(manifest))


def _header(ck: Path) -> tuple[dict, bytes]:
    raw = (ck / ckpt.STATE_FILE).read_bytes()
    (n,) = struct.unpack("<Q", raw[8:16])
    return json.loads(raw[16:16 + n]), raw[16 + n:]


def _set_header(ck: Path, header: dict, body: bytes) -> None:
    h = json.dumps(header).encode()
    (ck / ckpt.STATE_FILE).write_bytes(ckpt.MAGIC + struct.pack("<Q", len(h)) + h + body)


def _edit_tensor(field, value, name="params/w_out"):
    def edit(ck):
        header, body = _header(ck)
        header["tensors"][name][field] = value
        _set_header(ck, header, body)
    return edit


def _truncate(at):
    return lambda ck: (ck / ckpt.STATE_FILE).write_bytes((ck / ckpt.STATE_FILE).read_bytes()[:at])


def _flip(at):
    def edit(ck):
        data = bytearray((ck / ckpt.STATE_FILE).read_bytes())
        data[at % len(data)] ^= 0x5A
        (ck / ckpt.STATE_FILE).write_bytes(bytes(data))
    return edit


def _replace_tensor(name, array):
    def edit(ck):
        tensors = ckpt.decode_tensors(ck / ckpt.STATE_FILE, check_finite=False)
        tensors[name] = array(tensors[name])
        (ck / ckpt.STATE_FILE).write_bytes(ckpt.encode_tensors(tensors))
    return edit


def _write(name, data: bytes):
    return lambda ck: (ck / name).write_bytes(data)


def _remove(name):
    return lambda ck: (ck / name).unlink()


def _manifest(change):
    def edit(ck):
        m = json.loads((ck / ckpt.MANIFEST_FILE).read_text())
        change(m)
        (ck / ckpt.MANIFEST_FILE).write_text(json.dumps(m))
    return edit


def _drop_tensor(name):
    def edit(ck):
        tensors = ckpt.decode_tensors(ck / ckpt.STATE_FILE)
        del tensors[name]
        (ck / ckpt.STATE_FILE).write_bytes(ckpt.encode_tensors(tensors))
    return edit


# (name, damage, re-sign the manifest afterwards, a fragment the message must contain)
CASES = [
    *[(f"truncated-at-{n}", _truncate(n), True, "state.bin") for n in (0, 1, 7, 8, 12, 15, 16, 40, 200)],
    ("truncated-last-byte", lambda ck: _truncate(os.path.getsize(ck / ckpt.STATE_FILE) - 1)(ck), True, "state.bin"),
    ("truncated-unsigned", _truncate(100), False, "state.bin"),
    *[(f"flipped-byte-{n}", _flip(n), False, "state.bin") for n in (0, 9, 30, 500, -1)],
    *[(f"flipped-byte-resigned-{n}", _flip(n), True, "state.bin") for n in (0, 3, 10, 17, 20)],
    ("wrong-shape", _replace_tensor("params/w_out", lambda a: np.ascontiguousarray(a.T)), True, "shape"),
    ("wrong-shape-extra-axis", _replace_tensor("params/b_out", lambda a: a[None]), True, "shape"),
    ("wrong-dtype-float64", _replace_tensor("params/w_out", lambda a: a.astype(np.float64)), True, "float64"),
    ("wrong-dtype-int32", _replace_tensor("params/b_out", lambda a: a.astype(np.int32)), True, "int32"),
    ("nan-weights", _replace_tensor("params/w_out", lambda a: a * np.nan), True, "NaN"),
    ("inf-weights", _replace_tensor("params/b_out", lambda a: a + np.inf), True, "NaN or infinite"),
    ("huge-header-length", lambda ck: (ck / ckpt.STATE_FILE).write_bytes(
        ckpt.MAGIC + struct.pack("<Q", 2 ** 63) + b"{}"), True, "header length"),
    ("huge-shape", _edit_tensor("shape", [2 ** 39, 2 ** 39]), True, "nbytes"),
    ("huge-nbytes", _edit_tensor("nbytes", 2 ** 62), True, "nbytes"),
    ("huge-offset", _edit_tensor("offset", 2 ** 62), True, "past the end"),
    ("negative-offset", _edit_tensor("offset", -8), True, "offset"),
    ("bad-dtype-name", _edit_tensor("dtype", "object"), True, "dtype"),
    ("shape-not-a-list", _edit_tensor("shape", "8x67"), True, "shape"),
    ("missing-tensor", _drop_tensor("params/w_out"), True, "missing"),
    ("header-not-json", lambda ck: _set_header(ck, {}, b"") or (ck / ckpt.STATE_FILE).write_bytes(
        ckpt.MAGIC + struct.pack("<Q", 5) + b"{{{{{"), True, "JSON"),
    ("missing-state", _remove(ckpt.STATE_FILE), False, "state.bin"),
    ("missing-meta", _remove(ckpt.META_FILE), False, "meta.json"),
    ("missing-manifest", _remove(ckpt.MANIFEST_FILE), False, "manifest.json"),
    ("pickle-bomb-state", _write(ckpt.STATE_FILE, PICKLE_BOMB), True, "state.bin"),
    ("pickle-bomb-meta", _write(ckpt.META_FILE, PICKLE_BOMB), True, "meta.json"),
    ("pickle-bomb-manifest", _write(ckpt.MANIFEST_FILE, PICKLE_BOMB), False, "manifest.json"),
    ("future-version", _manifest(lambda m: m.update(version=ckpt.FORMAT_VERSION + 1)), False, "newer"),
    ("other-format", _manifest(lambda m: m.update(format="safetensors")), False, "format"),
    ("manifest-wrong-size", _manifest(lambda m: m["files"]["state.bin"].update(size=1)), False, "size"),
    ("manifest-wrong-hash", _manifest(lambda m: m["files"]["meta.json"].update(sha256="0" * 64)), False, "SHA-256"),
    ("manifest-missing-entry", _manifest(lambda m: m["files"].pop("meta.json")), False, "files"),
    ("meta-not-object", _write(ckpt.META_FILE, b"[1, 2, 3]"), True, "meta.json"),
    ("meta-not-json", _write(ckpt.META_FILE, b"{'step': 2}"), True, "meta.json"),
    ("meta-huge", _write(ckpt.META_FILE, b" " * (ckpt.MAX_JSON_BYTES + 1)), True, "too large"),
    ("empty-files", lambda ck: [(ck / n).write_bytes(b"") for n in (ckpt.STATE_FILE, ckpt.META_FILE)], True,
     "meta.json"),
]


def test_the_corpus_has_at_least_forty_cases():
    assert len(CASES) >= 40
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name, damage, resign, fragment", CASES, ids=[c[0] for c in CASES])
def test_malformed_checkpoint_raises_checkpoint_error(valid_run, tmp_path, name, damage, resign, fragment):
    run = tmp_path / "run"
    shutil.copytree(valid_run, run)
    ck = ckpt.resolve(run, "latest")
    damage(ck)
    if resign and (ck / ckpt.MANIFEST_FILE).exists():
        _resign(ck)
    size = sum(p.stat().st_size for p in ck.iterdir())
    PWNED.unlink(missing_ok=True)
    tracemalloc.start()
    try:
        with pytest.raises(charrnn.CheckpointError) as info:
            charrnn.load(run, "latest")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(info.value)
    assert str(ck) in message, message  # names the file
    assert fragment in message, message
    assert not PWNED.exists()  # no code ran
    assert peak < 4 * size + (2 << 20), (peak, size)  # memory bounded by the file size

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
    """The safetensors header of the checkpoint's tensor file, and the data after it."""
    raw = (ck / ckpt.STATE_FILE).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _set_header(ck: Path, header: dict | list | bytes, body: bytes) -> None:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    (ck / ckpt.STATE_FILE).write_bytes(struct.pack("<Q", len(h)) + h + body)


def _edit_tensor(field, value, name="params/w_out"):
    """Set one header field of tensor ``name``; ``value`` may be a function of the entry."""
    def edit(ck):
        header, body = _header(ck)
        entry = header[name]
        entry[field] = value(entry) if callable(value) else value
        _set_header(ck, header, body)
    return edit


def _last_tensor(header: dict) -> str:
    """The tensor whose bytes come last (its begin offset is > 0 in any real checkpoint)."""
    return max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


def _shift_last(by: int, pad: bytes = b""):
    """Move the last tensor's offsets by ``by`` bytes, inserting ``pad`` before its data."""
    def edit(ck):
        header, body = _header(ck)
        entry = header[_last_tensor(header)]
        begin, end = entry["data_offsets"]
        entry["data_offsets"] = [begin + by, end + by]
        _set_header(ck, header, body[:begin] + pad + body[begin:])
    return edit


def _edit_header(change):
    def edit(ck):
        header, body = _header(ck)
        change(header)
        _set_header(ck, header, body)
    return edit


def _duplicate_name(ck):
    header, body = _header(ck)
    name = _last_tensor(header)
    text = json.dumps(header)
    _set_header(ck, (text[:-1] + f", {json.dumps(name)}: {json.dumps(header[name])}}}").encode(), body)


def _as_version(version: int, state_name: str):
    """Relabel the checkpoint: manifest version ``version`` with its tensor file named ``state_name``."""
    def edit(ck):
        (ck / ckpt.STATE_FILE).rename(ck / state_name)
        m = json.loads((ck / ckpt.MANIFEST_FILE).read_text())
        m["version"] = version
        m["files"][state_name] = m["files"].pop(ckpt.STATE_FILE)
        (ck / ckpt.MANIFEST_FILE).write_text(json.dumps(m))
    return edit


def _v1_state(data: bytes):
    """A version-1 checkpoint whose ``state.bin`` holds ``data``."""
    def edit(ck):
        _as_version(1, ckpt.LEGACY_STATE_FILE)(ck)
        (ck / ckpt.LEGACY_STATE_FILE).write_bytes(data)
    return edit


def _truncate(at):
    return lambda ck: (ck / ckpt.STATE_FILE).write_bytes((ck / ckpt.STATE_FILE).read_bytes()[:at])


def _flip(at, after: bytes = b""):
    """Flip byte ``at`` of the tensor file, counted from the first occurrence of ``after``."""
    def edit(ck):
        data = bytearray((ck / ckpt.STATE_FILE).read_bytes())
        at_ = data.find(after) + at if after else at
        data[at_ % len(data)] ^= 0x5A
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


STATE = ckpt.STATE_FILE
# (name, damage, re-sign the manifest afterwards, a fragment the message must contain)
CASES = [
    *[(f"truncated-at-{n}", _truncate(n), True, STATE) for n in (0, 1, 7, 8, 12, 15, 16, 40, 200)],
    ("truncated-last-byte", lambda ck: _truncate(os.path.getsize(ck / ckpt.STATE_FILE) - 1)(ck), True, STATE),
    ("truncated-unsigned", _truncate(100), False, STATE),
    *[(f"flipped-byte-{n}", _flip(n), False, STATE) for n in (0, 9, 30, 500, -1)],
    # Past the 8 length bytes, aim into the parameters' header entries: `load` reads only those, so a
    # renamed carry or optimizer tensor (the header lists them first) is rightly harmless to it.
    *[(f"flipped-byte-resigned-{n}", _flip(n, b'"params/' if n >= 8 else b""), True, STATE)
      for n in (0, 3, 10, 17, 20)],
    ("wrong-shape", _replace_tensor("params/w_out", lambda a: np.ascontiguousarray(a.T)), True, "shape"),
    ("wrong-shape-extra-axis", _replace_tensor("params/b_out", lambda a: a[None]), True, "shape"),
    ("wrong-dtype-float64", _replace_tensor("params/w_out", lambda a: a.astype(np.float64)), True, "float64"),
    ("wrong-dtype-int32", _replace_tensor("params/b_out", lambda a: a.astype(np.int32)), True, "int32"),
    ("nan-weights", _replace_tensor("params/w_out", lambda a: a * np.nan), True, "NaN"),
    ("inf-weights", _replace_tensor("params/b_out", lambda a: a + np.inf), True, "NaN or infinite"),
    ("huge-header-length", _write(STATE, struct.pack("<Q", 2 ** 63) + b"{}"), True, "header length"),
    ("header-length-past-the-file", _write(STATE, struct.pack("<Q", 3) + b"{}"), True, "header length"),
    ("huge-shape", _edit_tensor("shape", [2 ** 39, 2 ** 39]), True, "'data_offsets'"),
    ("huge-nbytes", _edit_tensor("data_offsets", lambda e: [e["data_offsets"][0], 2 ** 62]), True, "'data_offsets'"),
    ("huge-offset", _edit_tensor("data_offsets", lambda e: [d + 2 ** 62 for d in e["data_offsets"]]), True,
     "past the end"),
    ("negative-offset", _edit_tensor("data_offsets", lambda e: [-8, e["data_offsets"][1]]), True, "'data_offsets'"),
    ("offsets-reversed", _edit_tensor("data_offsets", lambda e: e["data_offsets"][::-1]), True, "'data_offsets'"),
    ("offsets-not-a-pair", _edit_tensor("data_offsets", lambda e: e["data_offsets"][:1]), True, "'data_offsets'"),
    ("offsets-not-ints", _edit_tensor("data_offsets", lambda e: [float(d) for d in e["data_offsets"]]), True,
     "'data_offsets'"),
    ("offsets-missing", _edit_header(lambda h: h["params/w_out"].pop("data_offsets")), True, "'data_offsets'"),
    ("overlapping-tensors", _shift_last(-4), True, "inside the tensor before it"),
    ("gap-between-tensors", _shift_last(4, b"\0" * 4), True, "unused"),
    ("trailing-bytes", lambda ck: _set_header(ck, *_header(ck)[:1], _header(ck)[1] + b"\0" * 4), True,
     "4 trailing bytes"),
    ("bad-dtype-name", _edit_tensor("dtype", "object"), True, "dtype"),
    ("dtype-float16", _edit_tensor("dtype", "F16"), True, "'dtype'"),
    ("dtype-bfloat16", _edit_tensor("dtype", "BF16"), True, "'dtype'"),
    ("dtype-not-a-string", _edit_tensor("dtype", ["F32"]), True, "'dtype'"),
    ("shape-not-a-list", _edit_tensor("shape", "8x67"), True, "shape"),
    ("shape-nine-axes", _edit_tensor("shape", [1] * 9), True, "'shape'"),
    ("shape-negative", _edit_tensor("shape", lambda e: [-1] + e["shape"][1:]), True, "'shape'"),
    ("shape-floats", _edit_tensor("shape", lambda e: [float(d) for d in e["shape"]]), True, "'shape'"),
    ("entry-not-an-object", _edit_header(lambda h: h.update({"params/w_out": [1, 2]})), True, "not an object"),
    ("header-not-an-object", lambda ck: _set_header(ck, [], _header(ck)[1]), True, "not an object"),
    ("metadata-not-strings", _edit_header(lambda h: h.update(__metadata__={"step": 2})), True, "'__metadata__'"),
    ("duplicate-tensor-name", _duplicate_name, True, "more than once"),
    ("missing-tensor", _drop_tensor("params/w_out"), True, "missing"),
    ("header-not-json", _write(STATE, struct.pack("<Q", 5) + b"{{{{{"), True, "JSON"),
    ("header-not-utf8", _write(STATE, struct.pack("<Q", 3) + b"{\xff}"), True, "JSON"),
    ("header-deeply-nested", _write(STATE, struct.pack("<Q", 200_000) + b"[" * 100_000 + b"]" * 100_000), True,
     STATE),
    ("missing-state", _remove(ckpt.STATE_FILE), False, STATE),
    ("missing-meta", _remove(ckpt.META_FILE), False, "meta.json"),
    ("missing-manifest", _remove(ckpt.MANIFEST_FILE), False, "manifest.json"),
    ("pickle-bomb-state", _write(ckpt.STATE_FILE, PICKLE_BOMB), True, STATE),
    ("pickle-bomb-state-v1", _v1_state(PICKLE_BOMB), True, ckpt.LEGACY_STATE_FILE),
    ("v1-empty-state", _v1_state(b""), True, ckpt.LEGACY_STATE_FILE),
    ("v1-manifest-lists-safetensors", _manifest(lambda m: m.update(version=1)), False, "'files'"),
    ("v2-manifest-lists-state-bin", _as_version(ckpt.FORMAT_VERSION, ckpt.LEGACY_STATE_FILE), True, "'files'"),
    ("safetensors-as-v1", _as_version(1, ckpt.LEGACY_STATE_FILE), True, "magic"),
    ("version-true", _manifest(lambda m: m.update(version=True)), False, "'version' is True"),
    ("pickle-bomb-meta", _write(ckpt.META_FILE, PICKLE_BOMB), True, "meta.json"),
    ("pickle-bomb-manifest", _write(ckpt.MANIFEST_FILE, PICKLE_BOMB), False, "manifest.json"),
    ("future-version", _manifest(lambda m: m.update(version=ckpt.FORMAT_VERSION + 1)), False, "newer"),
    ("other-format", _manifest(lambda m: m.update(format="safetensors")), False, "format"),
    ("manifest-wrong-size", _manifest(lambda m: m["files"][ckpt.STATE_FILE].update(size=1)), False, "size"),
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

"""Checkpoint files: tensor container round trip, validation of every corruption, atomic writes."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest

from charrnn import checkpoint as ckpt
from charrnn.checkpoint import CheckpointError
from charrnn.errors import CharrnnError

TENSORS = {
    "params/w": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
    "params/b": np.array([1.5, -2.25], np.float32),
    "opt/count": np.array(7, np.int32),
    "rng": np.array([123, 4_000_000_000], np.uint32),
    "big": np.array([2 ** 40, -3], np.int64),
    "f64": np.array([[np.pi]], np.float64),
    "flag": np.array([True, False, True]),
    "empty": np.zeros((0, 5), np.float32),
}
EXPECTED = {k: (v.shape, v.dtype.name) for k, v in TENSORS.items()}


@pytest.fixture(autouse=True)
def _no_fsync(monkeypatch):
    """Durability is not under test here and fsync dominates the run time on a shared disk."""
    monkeypatch.setattr(ckpt.os, "fsync", lambda fd: None)


def write(tmp_path, step=5, tensors=None, meta=None):
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    return ckpt.write_checkpoint(run, step, TENSORS if tensors is None else tensors, meta or {"step": step})


def resign(path):
    """Rewrite the manifest to match the files, as a careful forger would."""
    manifest = json.loads((path / ckpt.MANIFEST_FILE).read_text())
    for name in (ckpt.STATE_FILE, ckpt.META_FILE):
        data = (path / name).read_bytes()
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (path / ckpt.MANIFEST_FILE).write_text(json.dumps(manifest))


def state_with_header(path, header: bytes, body: bytes = b""):
    """A safetensors file: 8-byte little-endian header length, JSON header, data."""
    (path / ckpt.STATE_FILE).write_bytes(struct.pack("<Q", len(header)) + header + body)
    resign(path)


def header_of(tensors=TENSORS) -> dict:
    raw = ckpt.encode_tensors(tensors)
    (hlen,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + hlen])


def body_of(tensors=TENSORS) -> bytes:
    raw = ckpt.encode_tensors(tensors)
    (hlen,) = struct.unpack("<Q", raw[:8])
    return raw[8 + hlen:]


def assert_refused(path, *fragments, expected=EXPECTED, partial=False):
    with pytest.raises(CheckpointError) as e:
        ckpt.read_checkpoint(path, expected, partial=partial)
    msg = str(e.value)
    assert str(path) in msg  # names the file (or the checkpoint directory's file)
    for f in fragments:
        assert f in msg, msg
    return msg


# --- round trips ----------------------------------------------------------------------------------


def test_tensor_round_trip(tmp_path):
    path = tmp_path / "state.safetensors"
    path.write_bytes(ckpt.encode_tensors(TENSORS))
    out = ckpt.decode_tensors(path, EXPECTED)
    assert sorted(out) == sorted(TENSORS)
    for k, v in TENSORS.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape
        np.testing.assert_array_equal(out[k], v)
    assert ckpt.decode_tensors(path).keys() == TENSORS.keys()  # no expectations: everything
    part = ckpt.decode_tensors(path, {"rng": EXPECTED["rng"]}, partial=True)
    assert list(part) == ["rng"]


def test_unstorable_dtype_refused_when_writing():
    with pytest.raises(ValueError, match="float16"):
        ckpt.encode_tensors({"h": np.zeros(2, np.float16)})
    with pytest.raises(ValueError, match="object"):
        ckpt.encode_tensors({"o": np.array([None], object)})


def test_checkpoint_round_trip(tmp_path):
    meta = {"step": 5, "best_val": 1.25, "note": "ü"}
    path = write(tmp_path, meta=meta)
    assert path.name == "ckpt-00000005"
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "meta.json", "state.safetensors"]
    tensors, got_meta = ckpt.read_checkpoint(path, EXPECTED)
    assert got_meta == meta
    for k, v in TENSORS.items():
        np.testing.assert_array_equal(tensors[k], v)
    manifest = json.loads((path / ckpt.MANIFEST_FILE).read_text())
    assert manifest["version"] == ckpt.FORMAT_VERSION and manifest["format"] == "charrnn-checkpoint"


# --- every corruption is a CheckpointError naming the file ----------------------------------------


def test_truncated_state(tmp_path):
    path = write(tmp_path)
    data = (path / ckpt.STATE_FILE).read_bytes()
    (path / ckpt.STATE_FILE).write_bytes(data[:-5])
    assert_refused(path, ckpt.STATE_FILE, "size")
    resign(path)  # even with a matching manifest
    assert_refused(path, ckpt.STATE_FILE)
    for cut in (0, 5, 12, 20):
        (path / ckpt.STATE_FILE).write_bytes(data[:cut])
        resign(path)
        assert_refused(path, ckpt.STATE_FILE)


def test_flipped_byte(tmp_path):
    path = write(tmp_path)
    data = bytearray((path / ckpt.STATE_FILE).read_bytes())
    data[-3] ^= 0x01
    (path / ckpt.STATE_FILE).write_bytes(bytes(data))
    assert_refused(path, ckpt.STATE_FILE, "SHA-256")
    meta = bytearray((path / "meta.json").read_bytes())
    meta[2] ^= 0x20
    path2 = write(tmp_path, step=6)
    (path2 / "meta.json").write_bytes(bytes(meta))
    assert_refused(path2, "meta.json")


def test_wrong_shape_and_dtype(tmp_path):
    path = write(tmp_path)
    wrong = dict(EXPECTED, **{"params/w": ((4, 3), "float32")})
    assert_refused(path, "params/w", "[3, 4]", "[4, 3]", expected=wrong)
    wrong = dict(EXPECTED, **{"params/w": ((3, 4), "float64")})
    assert_refused(path, "params/w", "float32", "float64", expected=wrong)
    missing = dict(EXPECTED, extra=((1,), "float32"))
    assert_refused(path, "missing", "extra", expected=missing)
    fewer = {k: v for k, v in EXPECTED.items() if k != "flag"}
    assert_refused(path, "unexpected", "flag", expected=fewer)
    ckpt.read_checkpoint(path, fewer, partial=True)  # allowed when asked for a part


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights(tmp_path, bad):
    tensors = dict(TENSORS, **{"params/b": np.array([1.0, bad], np.float32)})
    with pytest.raises(CharrnnError, match="params/b holds NaN or infinite"):  # never written...
        write(tmp_path, tensors=tensors)
    assert list((tmp_path / "run").iterdir()) == []
    path = write(tmp_path)  # ...and refused when read, should one be made some other way
    (path / ckpt.STATE_FILE).write_bytes(ckpt.encode_tensors(tensors))
    resign(path)
    assert_refused(path, "params/b", "NaN or infinite")


@pytest.mark.parametrize("name", ["manifest.json", "state.safetensors", "meta.json"])
def test_missing_file(tmp_path, name):
    path = write(tmp_path)
    (path / name).unlink()
    assert_refused(path, name, "missing")


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere"):
        ckpt.read_checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no such run directory"):
        ckpt.resolve(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        ckpt.resolve(tmp_path / "empty")


def _offsets(h, f):
    w = h["params/w"]
    w["data_offsets"] = f(*w["data_offsets"])


@pytest.mark.parametrize("change, fragment", [
    (lambda h: h["params/w"].update(shape=[2 ** 39, 2 ** 39]), "'data_offsets'"),
    (lambda h: _offsets(h, lambda b, e: [b, 2 ** 62]), "'data_offsets'"),
    (lambda h: _offsets(h, lambda b, e: [b + 2 ** 62, e + 2 ** 62]), "past the end"),
    (lambda h: h["params/w"].update(shape=[-1, 4]), "shape"),
    (lambda h: h["params/w"].update(shape=[3.0, 4]), "shape"),
    (lambda h: h["params/w"].update(shape=[1] * 9), "shape"),
    (lambda h: h["params/w"].update(dtype="object"), "dtype"),
    (lambda h: _offsets(h, lambda b, e: [True, e]), "'data_offsets'"),
    (lambda h: h.update({"params/w": [1, 2]}), "not an object"),
    (lambda h: h.pop("params/w"), "unused"),  # its bytes stay: a gap in the data
])
def test_lying_header(tmp_path, change, fragment):
    path = write(tmp_path)
    header = header_of()
    change(header)
    state_with_header(path, json.dumps(header).encode(), body_of())
    assert_refused(path, ckpt.STATE_FILE, fragment)


def test_huge_declared_header_length(tmp_path):
    path = write(tmp_path)
    for hlen in (2 ** 63, ckpt.MAX_HEADER_BYTES + 1):
        (path / ckpt.STATE_FILE).write_bytes(struct.pack("<Q", hlen) + b"{}")
        resign(path)
        assert_refused(path, ckpt.STATE_FILE, "header length")


def test_bad_header_length_and_trailing_bytes(tmp_path):
    path = write(tmp_path)
    data = (path / ckpt.STATE_FILE).read_bytes()
    (path / ckpt.STATE_FILE).write_bytes(b"PICKLE!!" + data[8:])
    resign(path)
    assert_refused(path, ckpt.STATE_FILE, "header length")
    (path / ckpt.STATE_FILE).write_bytes(data + b"\0\0")
    resign(path)
    assert_refused(path, ckpt.STATE_FILE, "2 trailing bytes")


def test_deeply_nested_header(tmp_path):
    path = write(tmp_path)
    state_with_header(path, b"[" * 100_000 + b"]" * 100_000)
    assert_refused(path, ckpt.STATE_FILE)


@pytest.mark.parametrize("version, fragment", [(ckpt.FORMAT_VERSION + 1, "newer"), (0, "'version' is 0"), ("1", "'version' is '1'"),
                                               (None, "'version'")])
def test_other_format_versions(tmp_path, version, fragment):
    path = write(tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["version"] = version
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert_refused(path, "manifest.json", fragment)


@pytest.mark.parametrize("text, fragment", [
    ("{not json", "not valid JSON"),
    ("[]", "'format'"),
    ('{"format": "charrnn-checkpoint", "version": 1, "files": {}}', "'files'"),
    ('{"format": "charrnn-checkpoint", "version": 1, "files": {"state.bin": 1, "meta.json": 2}}', "not an object"),
    ("\xff", "not valid JSON"),
])
def test_bad_manifest(tmp_path, text, fragment):
    path = write(tmp_path)
    (path / "manifest.json").write_bytes(text.encode("latin-1"))
    assert_refused(path, "manifest.json", fragment)


def test_meta_must_be_an_object(tmp_path):
    path = write(tmp_path, meta={"step": 5})
    (path / "meta.json").write_text("[1, 2]")
    resign(path)
    assert_refused(path, "meta.json", "JSON object")


# --- atomic writes, pointers, pruning -------------------------------------------------------------


def test_atomic_write_leaves_no_temporaries(tmp_path):
    target = tmp_path / "config.json"
    ckpt.atomic_write(target, "one")
    ckpt.atomic_write(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_atomic_write_failure_is_a_charrnn_error(tmp_path):
    with pytest.raises(CharrnnError, match="cannot write"):
        ckpt.atomic_write(tmp_path / "no-such-dir" / "x.json", "data")
    assert list(tmp_path.iterdir()) == []


def test_rewriting_a_checkpoint_leaves_no_temporaries(tmp_path):
    path = write(tmp_path, meta={"step": 5, "v": 1})
    path = write(tmp_path, meta={"step": 5, "v": 2})
    run = path.parent
    assert [p.name for p in run.iterdir()] == ["ckpt-00000005"]
    assert ckpt.read_checkpoint(path)[1] == {"step": 5, "v": 2}


def test_clean_temporaries(tmp_path):
    run = tmp_path / "run"
    path = write(tmp_path)
    (run / ".tmp-ckpt-00000009-123").mkdir()
    (run / ".tmp-config.json-123").write_text("x")
    # A checkpoint moved aside for a rewrite whose replacement never arrived is put back.
    path.rename(run / ".tmp-old-ckpt-00000005-77")
    assert ckpt.clean_temporaries(run) == 2
    assert sorted(p.name for p in run.iterdir()) == ["ckpt-00000005"]
    ckpt.read_checkpoint(run / "ckpt-00000005", EXPECTED)


def test_pointers(tmp_path):
    run = tmp_path / "run"
    write(tmp_path, step=3)
    assert ckpt.read_pointer(run, "latest") is None
    ckpt.set_pointer(run, "latest", "ckpt-00000003")
    assert ckpt.read_pointer(run, "latest") == "ckpt-00000003"
    assert ckpt.resolve(run, "best") == run / "ckpt-00000003"  # falls back to latest
    assert ckpt.resolve(run / "ckpt-00000003") == run / "ckpt-00000003"
    for target in ("../../etc", "ckpt-../../x", "state.bin"):
        (run / "latest").write_text(target)
        with pytest.raises(CheckpointError, match="not a checkpoint"):
            ckpt.read_pointer(run, "latest")
    (run / "latest").write_text("ckpt-00000099")
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt.resolve(run)


def test_resolve_follows_a_pointer_that_moved_on_while_it_looked(tmp_path, monkeypatch):
    # A trainer with --keep 1 commits ckpt 4 and retires ckpt 3 between our reading the
    # pointer (still "3") and looking for the directory: resolve must read the pointer again.
    run = tmp_path / "run"
    write(tmp_path, step=3)
    answers = iter(["ckpt-00000002", "ckpt-00000003"])  # 2 is already gone, then the pointer moved
    monkeypatch.setattr(ckpt, "read_pointer", lambda run_dir, pointer: next(answers))
    assert ckpt.resolve(run) == run / "ckpt-00000003"


def test_prune_keeps_latest_and_best(tmp_path):
    run = tmp_path / "run"
    for step in (1, 2, 3, 4, 5):
        write(tmp_path, step=step)
    ckpt.set_pointer(run, "best", ckpt.checkpoint_name(2))
    ckpt.set_pointer(run, "latest", ckpt.checkpoint_name(5))
    ckpt.prune(run, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["ckpt-00000002", "ckpt-00000004", "ckpt-00000005"]
    ckpt.prune(run, keep=1)
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["ckpt-00000002", "ckpt-00000005"]
    # latest is protected even when it is not among the newest (e.g. after a resume rewrote history).
    ckpt.set_pointer(run, "latest", ckpt.checkpoint_name(2))
    ckpt.set_pointer(run, "best", ckpt.checkpoint_name(2))
    ckpt.prune(run, keep=1)
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["ckpt-00000002", "ckpt-00000005"]

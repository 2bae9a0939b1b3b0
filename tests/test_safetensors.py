"""Checkpoint tensors as safetensors: other tools read them, every stored dtype round-trips bit
for bit, and checkpoints of the version-1 format (``state.bin``) still load."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import safetensors
import safetensors.numpy

import charrnn
from charrnn import checkpoint as ckpt
from charrnn.checkpoint import CheckpointError
from charrnn.config import ModelConfig, RunConfig, TrainConfig


def encode_chrnnt01(tensors) -> bytes:
    """The version-1 tensor file exactly as charrnn wrote it until 2026-12-04 (commit 317bd79)."""
    entries, chunks, offset = {}, [], 0
    for name, arr in tensors.items():
        arr = np.asarray(arr)
        dname = arr.dtype.name
        data = np.ascontiguousarray(arr, dtype=ckpt.DTYPES[dname]).tobytes()
        entries[name] = {"dtype": dname, "shape": list(arr.shape), "offset": offset, "nbytes": len(data)}
        chunks.append(data)
        offset += len(data)
    header = json.dumps({"tensors": entries}, sort_keys=True).encode("utf-8")
    return b"CHRNNT01" + struct.pack("<Q", len(header)) + header + b"".join(chunks)


def to_version_1(ck: Path) -> None:
    """Rewrite checkpoint directory ``ck`` as charrnn wrote it before safetensors."""
    tensors = ckpt.decode_tensors(ck / ckpt.STATE_FILE)
    (ck / ckpt.STATE_FILE).unlink()
    state = encode_chrnnt01(tensors)
    (ck / "state.bin").write_bytes(state)
    meta = (ck / ckpt.META_FILE).read_bytes()
    manifest = {"format": "charrnn-checkpoint", "version": 1,
                "files": {"state.bin": {"sha256": hashlib.sha256(state).hexdigest(), "size": len(state)},
                          "meta.json": {"sha256": hashlib.sha256(meta).hexdigest(), "size": len(meta)}}}
    (ck / ckpt.MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("st")
    (d / "c.txt").write_text("to be or not to be, that is the question. " * 20, encoding="utf-8")
    config = RunConfig(model=ModelConfig(cell="lstm", hidden=8, layers=2),
                       train=TrainConfig(batch_size=2, seq_len=8, max_steps=2))
    return charrnn.train(str(d / "c.txt"), config, out=d / "run").run_dir


def test_checkpoint_holds_a_safetensors_file_other_tools_read(trained):
    ck = ckpt.resolve(trained, "latest")
    assert sorted(p.name for p in ck.iterdir()) == ["manifest.json", "meta.json", "state.safetensors"]
    manifest = json.loads((ck / ckpt.MANIFEST_FILE).read_text())
    assert manifest["version"] == ckpt.FORMAT_VERSION == 2
    assert set(manifest["files"]) == {"state.safetensors", "meta.json"}

    run = charrnn.load(trained, "latest")
    params = ckpt.flatten(run.params, "params")
    assert {"params/cells/0/w_ih", "params/cells/1/w_hh", "params/cells/1/b_ih", "params/w_out",
            "params/b_out"} <= set(params)
    with safetensors.safe_open(str(ck / "state.safetensors"), framework="numpy") as f:
        assert set(params) <= set(f.keys())
        for name, value in params.items():
            np.testing.assert_array_equal(f.get_tensor(name), np.asarray(value))
    loaded = safetensors.numpy.load_file(str(ck / "state.safetensors"))
    assert loaded["params/cells/0/w_ih"].shape == (run.vocab.size, 4 * 8)
    assert loaded["params/w_out"].dtype == np.float32
    assert any(name.startswith("opt/") for name in loaded) and "step" in loaded


def test_version_1_checkpoints_still_load(trained, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    ck = ckpt.resolve(run_dir, "latest")
    to_version_1(ck)
    assert sorted(p.name for p in ck.iterdir()) == ["manifest.json", "meta.json", "state.bin"]
    old, new = charrnn.load(run_dir, "latest"), charrnn.load(trained, "latest")
    for (name, a), b in zip(ckpt.flatten(old.params, "p").items(), ckpt.flatten(new.params, "p").values()):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    # Everything, not only the parameters: what resuming reads.
    v1, _ = ckpt.read_checkpoint(ck)
    v2, _ = ckpt.read_checkpoint(ckpt.resolve(trained, "latest"))
    assert v1.keys() == v2.keys()
    for name in v1:
        assert v1[name].dtype == v2[name].dtype and v1[name].tobytes() == v2[name].tobytes(), name


def test_version_1_checkpoints_are_still_validated(trained, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    ck = ckpt.resolve(run_dir, "latest")
    to_version_1(ck)
    raw = (ck / "state.bin").read_bytes()
    (hlen,) = struct.unpack("<Q", raw[8:16])
    header = json.loads(raw[16:16 + hlen])
    header["tensors"]["params/w_out"]["nbytes"] = 2 ** 62
    h = json.dumps(header).encode()
    state = b"CHRNNT01" + struct.pack("<Q", len(h)) + h + raw[16 + hlen:]
    (ck / "state.bin").write_bytes(state)
    manifest = json.loads((ck / ckpt.MANIFEST_FILE).read_text())
    manifest["files"]["state.bin"] = {"sha256": hashlib.sha256(state).hexdigest(), "size": len(state)}
    (ck / ckpt.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="state.bin: tensor params/w_out: field 'nbytes'"):
        charrnn.load(run_dir, "latest")


def test_a_version_from_the_future_is_refused(trained, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    ck = ckpt.resolve(run_dir, "latest")
    manifest = json.loads((ck / ckpt.MANIFEST_FILE).read_text())
    manifest["version"] = ckpt.FORMAT_VERSION + 1
    (ck / ckpt.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"manifest.json: field 'version' is 3; .*newer charrnn: upgrade"):
        charrnn.load(run_dir, "latest")


def _special_values(dtype: np.dtype) -> np.ndarray:
    """Values where a lossy or byte-swapped round trip would show: extremes, -0, subnormals, NaN
    payloads (the finite check is off for this test)."""
    if dtype.kind == "b":
        return np.array([[True, False], [False, True]])
    if dtype.kind == "f":
        info = np.finfo(dtype)
        bits = np.array([0x7FC00001, 0xFFC12345], np.uint32) if dtype.itemsize == 4 else \
            np.array([0x7FF8000000000001, 0xFFF0000000000123], np.uint64)
        nans = bits.view(dtype)
        return np.concatenate([np.array([0.0, -0.0, 1 / 3, info.max, info.min, info.tiny, info.smallest_subnormal,
                                         np.inf, -np.inf], dtype), nans]).reshape(1, -1)
    info = np.iinfo(dtype)
    return np.array([info.min, info.max, 0, 1, info.max // 3], dtype)[:, None]


@pytest.mark.parametrize("dname", sorted(ckpt.DTYPES))
def test_round_trip_is_bit_exact_for_every_stored_dtype(tmp_path, dname):
    dtype = ckpt.DTYPES[dname]
    values = _special_values(dtype)
    tensors = {"values": values, "scalar": np.ones((), dtype), "empty": np.zeros((0, 3), dtype),
               "strided": values.T[::-1], "big_endian": values.astype(dtype.newbyteorder(">"))}
    path = tmp_path / "state.safetensors"
    path.write_bytes(ckpt.encode_tensors(tensors))
    expected = {k: (v.shape, dname) for k, v in tensors.items()}
    out = ckpt.decode_tensors(path, expected, check_finite=False)
    assert out.keys() == tensors.keys()
    for name, arr in tensors.items():
        got = out[name]
        assert got.dtype == dtype and got.shape == arr.shape, name
        assert got.tobytes() == np.ascontiguousarray(arr, dtype=dtype).tobytes(), name
        assert got.flags.writeable, name
    # The library reads the same bytes.
    for name, arr in safetensors.numpy.load(path.read_bytes()).items():
        assert arr.tobytes() == out[name].tobytes(), name


@pytest.mark.parametrize("dtype", [np.float16, np.complex64, np.uint8, object])
def test_other_dtypes_are_refused_when_writing(dtype):
    with pytest.raises(ValueError, match="cannot be stored"):
        ckpt.encode_tensors({"x": np.zeros(2, dtype)})


def test_a_file_from_another_tool_with_metadata_is_read(tmp_path):
    path = tmp_path / "state.safetensors"
    path.write_bytes(safetensors.numpy.save({"a": np.arange(6, dtype=np.float32).reshape(2, 3)},
                                            metadata={"format": "np", "note": "made elsewhere"}))
    out = ckpt.decode_tensors(path, {"a": ((2, 3), "float32")})
    np.testing.assert_array_equal(out["a"], np.arange(6, dtype=np.float32).reshape(2, 3))


def test_partial_read_returns_only_what_is_asked(tmp_path):
    path = tmp_path / "state.safetensors"
    path.write_bytes(ckpt.encode_tensors({"params/w": np.ones((2, 2), np.float32), "opt/mu": np.zeros(3)}))
    assert list(ckpt.decode_tensors(path, {"params/w": ((2, 2), "float32")}, partial=True)) == ["params/w"]
    with pytest.raises(CheckpointError, match="unexpected tensor"):
        ckpt.decode_tensors(path, {"params/w": ((2, 2), "float32")})


TENSORS = {"params/w": np.arange(12, dtype=np.float32).reshape(3, 4) / 7, "step": np.array(7, np.int32),
           "rng": np.array([1, 4_000_000_000], np.uint32), "flag": np.array([True, False])}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_random_damage_to_the_safetensors_file_is_a_checkpoint_error(tmp_path_factory, data):
    """Any truncation, byte change or insertion, with the manifest forged to match, is refused
    with a CheckpointError naming the file, or (if harmless) reads back the same names."""
    run = tmp_path_factory.mktemp("fuzz")
    path = ckpt.write_checkpoint(run, 5, TENSORS, {"step": 5})
    raw = bytearray((path / ckpt.STATE_FILE).read_bytes())
    kind = data.draw(st.sampled_from(["flip", "truncate", "splice"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    elif kind == "truncate":
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    else:
        i = data.draw(st.integers(0, len(raw)))
        raw[i:i] = data.draw(st.binary(min_size=1, max_size=8))
    (path / ckpt.STATE_FILE).write_bytes(bytes(raw))
    manifest = json.loads((path / ckpt.MANIFEST_FILE).read_text())
    manifest["files"][ckpt.STATE_FILE] = {"sha256": hashlib.sha256(raw).hexdigest(), "size": len(raw)}
    (path / ckpt.MANIFEST_FILE).write_text(json.dumps(manifest))
    try:
        tensors, _ = ckpt.read_checkpoint(path, {k: (v.shape, v.dtype.name) for k, v in TENSORS.items()})
    except CheckpointError as e:
        assert str(path / ckpt.STATE_FILE) in str(e)
    else:
        assert tensors.keys() == TENSORS.keys()

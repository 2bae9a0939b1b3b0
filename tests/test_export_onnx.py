"""ONNX export: the graph passes onnx.checker, and onnxruntime stepping it one token at a time
gives charrnn's logits (with resets at start tokens), its metadata, and the documented loop."""

from __future__ import annotations

import json
import re
import runpy
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import assert_refused

onnx = pytest.importorskip("onnx", reason="ONNX export needs the export extra: pip install -e '.[export]'")
ort = pytest.importorskip("onnxruntime", reason="ONNX export tests need onnxruntime (the export extra)")

from flax import nnx  # noqa: E402

import charrnn  # noqa: E402
from charrnn.config import DataConfig, ModelConfig, RunConfig, TrainConfig  # noqa: E402
from charrnn.export.onnx import build_onnx, export_onnx, metadata  # noqa: E402
from charrnn.inference import Run  # noqa: E402
from charrnn.labels import LabelVocab  # noqa: E402
from charrnn.model import build_model, split_model  # noqa: E402
from charrnn.vocab import END, START, Vocab  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "export.md"
TEXT = "The cat sat on the mat.\nThe dog ran to the barn, é 😀!\n"
STANDARD_OPS = {"Equal", "Unsqueeze", "Where", "Split", "Identity", "Gather", "Cast", "RNN", "LSTM", "GRU",
                "Concat", "Squeeze", "Gemm"}


LABELS = LabelVocab(("news", "poem", "recipe"), (5, 9, 2))
MIXES = ("news=0.7,poem=0.3", "poem=0.2,recipe=0.8", "news=1,poem=1,recipe=1")


def _run(cell: str, layers: int = 2, hidden: int = 16, scale: float = 2.0, labels=None) -> Run:
    """A run built in memory (no training): PyTorch-style random weights times ``scale``, so the
    gates leave their linear range and the logits spread over a few units. ``labels``: a
    ``LabelVocab`` for a labelled run (its label vectors are scaled too)."""
    vocab = Vocab.from_texts([TEXT])
    model = ModelConfig(cell=cell, layers=layers, hidden=hidden, **({"label_dim": 5} if labels else {}))
    config = RunConfig(model=model)
    _, params = split_model(build_model(config.model, vocab.size, seed=3, num_labels=labels.size if labels else 0))
    params = jax.tree_util.tree_map(lambda a: a * scale, params)
    return Run(Path("in-memory"), config, vocab, Path("in-memory"), params, {}, labels=labels)


def _session(run: Run, tmp_path: Path):
    path = export_onnx(run, tmp_path / "model.onnx")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _tokens(vocab_size: int, rows: int, steps: int) -> np.ndarray:
    """Random character ids with start tokens at the beginning, in the middle and at the end."""
    tokens = np.random.default_rng(1).integers(2, vocab_size, (rows, steps)).astype(np.int32)
    resets = [(0, 0), (0, 50), (0, 51), (0, 120), (1, 77), (1, 78), (2, steps - 1), (1, 150)]
    for r, t in resets:
        tokens[r % rows, t % steps] = START
    tokens[-1, 13] = END  # the end token is an ordinary input
    return tokens


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_onnxruntime_steps_match_charrnn(cell, tmp_path):
    run = _run(cell)
    sess = _session(run, tmp_path)
    model = nnx.merge(run.graphdef, run.params)
    steps = 200
    for rows in (1, 3):  # one batch size per session: the batch dimension is dynamic
        tokens = _tokens(run.vocab.size, rows, steps)
        # A non-zero state going in: rows that do not start with START must carry it.
        rng = np.random.default_rng(2)
        carry = jax.tree_util.tree_map(lambda a: rng.normal(0, 0.5, a.shape).astype(np.float32),
                                       model.initial_carry(rows))
        final, logits_BxTxV = model(carry, tokens)
        logits_BxTxV = np.asarray(logits_BxTxV)
        state = {"h_in": np.stack([c[-1] for c in carry])}
        if cell == "lstm":
            state["c_in"] = np.stack([c[0] for c in carry])
        names = [o.name for o in sess.get_outputs()]
        assert names == ["logits", "h_out"] + (["c_out"] if cell == "lstm" else [])
        for t in range(steps):
            logits, *new = sess.run(names, {"token": tokens[:, t].astype(np.int64), **state})
            np.testing.assert_allclose(logits, logits_BxTxV[:, t], atol=1e-5, rtol=0,
                                       err_msg=f"{cell}, {rows} rows, step {t}")
            state = {n.replace("_out", "_in"): v for n, v in zip(names[1:], new)}
        np.testing.assert_allclose(state["h_in"], np.stack([c[-1] for c in final]), atol=1e-5, rtol=0)
        if cell == "lstm":
            np.testing.assert_allclose(state["c_in"], np.stack([c[0] for c in final]), atol=1e-5, rtol=0)
    assert np.ptp(logits_BxTxV) > 1.0  # the comparison is not between near-constant outputs


def _steps_with_resets(model, carry, tokens_BxT, label_weights_BxL):
    """charrnn's logits ``(B, T, V)`` and final carry stepping a labelled model one token at a
    time (``step_with`` and ``label_term``, as the sampler), zeroing rows that read START."""
    weights, term_BxG = model.step_weights(), model.label_term(label_weights_BxL)

    def one(carry, token_B):
        keep_Bx1 = (token_B != START)[:, None]
        carry = jax.tree_util.tree_map(lambda c: jax.numpy.where(keep_Bx1, c, 0.0), carry)
        return model.step_with(weights, carry, token_B, label_term_BxG=term_BxG)

    final, logits_TxBxV = jax.jit(lambda c, t: jax.lax.scan(one, c, t))(carry, tokens_BxT.T)
    return final, np.swapaxes(np.asarray(logits_TxBxV), 0, 1)


@pytest.mark.parametrize("mix", [False, True], ids=["one-label", "mix"])
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_labelled_onnxruntime_steps_match_charrnn(cell, mix, tmp_path):
    """``label_weights`` conditions every step as charrnn's label term does: one label per row
    (against the model's windowed call over label ids) and mixes (against its sampling step)."""
    run = _run(cell, labels=LABELS)
    sess = _session(run, tmp_path)
    model = nnx.merge(run.graphdef, run.params)
    rows, steps = 3, 200
    tokens = _tokens(run.vocab.size, rows, steps)
    rng = np.random.default_rng(2)
    carry = jax.tree_util.tree_map(lambda a: rng.normal(0, 0.5, a.shape).astype(np.float32),
                                   model.initial_carry(rows))
    if mix:
        weights_BxL = np.stack([LABELS.weights(m) for m in MIXES])
        final, logits_BxTxV = _steps_with_resets(model, carry, tokens, weights_BxL)
    else:
        ids_B = np.array([2, 0, 1])  # a different label on each row
        weights_BxL = np.eye(LABELS.size, dtype=np.float32)[ids_B]
        final, logits_BxTxV = model(carry, tokens, np.repeat(ids_B[:, None], steps, axis=1))
        logits_BxTxV = np.asarray(logits_BxTxV)
    names = [o.name for o in sess.get_outputs()]
    state = {"h_in": np.stack([c[-1] for c in carry])}
    if cell == "lstm":
        state["c_in"] = np.stack([c[0] for c in carry])
    for t in range(steps):
        feed = {"token": tokens[:, t].astype(np.int64), "label_weights": weights_BxL, **state}
        logits, *new = sess.run(names, feed)
        np.testing.assert_allclose(logits, logits_BxTxV[:, t], atol=1e-5, rtol=0, err_msg=f"{cell}, step {t}")
        state = {n.replace("_out", "_in"): v for n, v in zip(names[1:], new)}
    np.testing.assert_allclose(state["h_in"], np.stack([c[-1] for c in final]), atol=1e-5, rtol=0)
    assert np.ptp(logits_BxTxV) > 1.0
    # The label matters: the same tokens under another label give other logits.
    other = {"token": tokens[:, 1].astype(np.int64), "label_weights": weights_BxL[::-1].copy(),
             **{k: np.zeros_like(v) for k, v in state.items()}}
    same = {**other, "label_weights": weights_BxL}
    assert np.abs(sess.run(["logits"], other)[0][0] - sess.run(["logits"], same)[0][0]).max() > 1e-2


def test_labelled_model_inputs_and_metadata(tmp_path):
    run = _run("gru", layers=2, hidden=8, labels=LABELS)
    export_onnx(run, tmp_path / "m.onnx")
    proto = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    assert {n.op_type for n in proto.graph.node} <= STANDARD_OPS
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
              for i in proto.graph.input}
    assert list(inputs) == ["token", "h_in", "label_weights"]
    assert inputs["label_weights"] == ["batch", 3]
    meta = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]
                                ).get_modelmeta().custom_metadata_map
    assert meta == metadata(run)
    assert json.loads(meta["labels"]) == ["news", "poem", "recipe"]
    assert json.loads(meta["label_counts"]) == [5, 9, 2]
    assert "label_weights" in meta["usage"] and "\n" not in meta["usage"]
    assert "labels" not in metadata(_run("gru", layers=1, hidden=4))  # unlabelled: no label keys


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_model_is_checked_standard_onnx(cell, tmp_path):
    run = _run(cell, layers=3, hidden=8)
    export_onnx(run, tmp_path / "m.onnx")
    proto = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    ops = [n.op_type for n in proto.graph.node]
    assert set(ops) <= STANDARD_OPS, set(ops) - STANDARD_OPS
    assert ops.count({"rnn": "RNN", "lstm": "LSTM", "gru": "GRU"}[cell]) == 3
    assert all(o.domain in ("", "ai.onnx") for o in proto.opset_import)
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
              for i in proto.graph.input}
    assert inputs["token"] == ["batch"]
    assert inputs["h_in"] == [3, "batch", 8]
    assert ("c_in" in inputs) == (cell == "lstm")
    assert "label_weights" not in inputs


def test_single_layer_exports(tmp_path):
    run = _run("gru", layers=1, hidden=8)
    sess = _session(run, tmp_path)
    tokens = _tokens(run.vocab.size, 2, 20)
    model = nnx.merge(run.graphdef, run.params)
    _, ref = model(model.initial_carry(2), tokens)
    h = np.zeros((1, 2, 8), np.float32)
    for t in range(20):
        logits, h = sess.run(None, {"token": tokens[:, t].astype(np.int64), "h_in": h})
        np.testing.assert_allclose(logits, np.asarray(ref)[:, t], atol=1e-5, rtol=0)


def test_metadata_round_trips(tmp_path):
    run = _run("lstm", layers=2, hidden=8)
    meta = _session(run, tmp_path).get_modelmeta().custom_metadata_map
    assert meta == metadata(run)
    assert json.loads(meta["vocabulary"]) == list(run.vocab.chars)  # é and 😀 included
    assert "😀" in json.loads(meta["vocabulary"])
    assert (int(meta["start_id"]), int(meta["end_id"])) == (START, END)
    assert (meta["cell"], int(meta["layers"]), int(meta["hidden"])) == ("lstm", 2, 8)
    assert meta["charrnn_version"] == charrnn.__version__
    assert "\n" not in meta["usage"] and "h_in" in meta["usage"]


def test_vocabulary_with_a_lone_surrogate_round_trips(tmp_path):
    run = _run("rnn", layers=1, hidden=4)
    run = Run(run.run_dir, run.config, Vocab(run.vocab.chars[:-1] + ("\ud800",)), run.checkpoint, run.params, {})
    meta = _session(run, tmp_path).get_modelmeta().custom_metadata_map
    assert json.loads(meta["vocabulary"]) == list(run.vocab.chars)


@pytest.mark.parametrize("cell, label", [("lstm", None), ("gru", None), ("lstm", "poem"), ("gru", MIXES[0])])
def test_greedy_onnx_sampling_equals_charrnn(cell, label, tmp_path):
    """The protocol the docs describe (start token, then the prime, then feed each output back)
    gives ``charrnn sample --greedy``'s text (``--label``: with the label's weights fed too)."""
    run = _run(cell, labels=LABELS if label else None)
    sess = _session(run, tmp_path)
    prime, length = "The ", 60
    names = [o.name for o in sess.get_outputs()]
    state = {i.name: np.zeros((2, 1, 16), np.float32) for i in sess.get_inputs() if i.name.endswith("_in")}
    extra = {"label_weights": LABELS.weights(label)[None]} if label else {}
    text, feed = prime, [START] + list(run.vocab.encode(prime))
    while len(text) < len(prime) + length:
        logits, *new = sess.run(names, {"token": np.array([feed.pop(0)], np.int64), **state, **extra})
        state = {n.replace("_out", "_in"): v for n, v in zip(names[1:], new)}
        if feed:
            continue
        logits[0, START] = -np.inf
        token = int(np.argmax(logits[0]))
        if token == END:
            break
        text, feed = text + run.vocab.chars[token - 2], [token]
    expected = run.sample(prime=prime, length=length, greedy=True, label=label)[0].text
    assert text == expected


def test_docs_sampling_example_runs(tmp_path, monkeypatch, capsys):
    block = DOCS.read_text(encoding="utf-8").split("<!-- onnx-sampling-example -->", 1)[1]
    code = re.search(r"```python\n(.*?)```", block, re.S).group(1)
    assert len(code.strip().splitlines()) <= 22
    run = _run("lstm")
    export_onnx(run, tmp_path / "model.onnx")
    script = tmp_path / "example.py"
    script.write_text(code, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(script), run_name="__main__")
    text = capsys.readouterr().out[:-1]  # print's newline
    assert text.startswith("The ") and len(text) > len("The ")
    assert len(text) <= 300 and set(text) <= set(run.vocab.chars)


def test_build_onnx_in_memory():
    proto = build_onnx(_run("rnn", layers=1, hidden=4))
    assert proto.opset_import[0].version >= 17 and proto.producer_name == "charrnn"


# --- the CLI ----------------------------------------------------------------------------------


def _invoke(*args):
    from charrnn.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export")
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT * 8, encoding="utf-8")
    config = RunConfig(model=ModelConfig(cell="lstm", layers=2, hidden=8),
                       train=TrainConfig(max_steps=3, batch_size=2, seq_len=8))
    return charrnn.train(corpus, config, out=root / "run").run_dir


def test_cli_writes_onnx_that_matches_the_run(trained, tmp_path):
    out = tmp_path / "model.onnx"
    result = _invoke("export", trained, "--onnx", out, "--checkpoint", "latest")
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temporary file left
    run = charrnn.load(trained, "latest")
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    tokens = np.array([[START] + list(run.vocab.encode("The cat"))], np.int32)
    model = nnx.merge(run.graphdef, run.params)
    _, ref = model(model.initial_carry(1), tokens)
    state = {"h_in": np.zeros((2, 1, 8), np.float32), "c_in": np.zeros((2, 1, 8), np.float32)}
    for t in range(tokens.shape[1]):
        logits, h, c = sess.run(None, {"token": tokens[:, t].astype(np.int64), **state})
        state = {"h_in": h, "c_in": c}
        np.testing.assert_allclose(logits, np.asarray(ref)[:, t], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def trained_labelled(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export-labelled")
    corpus = root / "corpus.tsv"
    corpus.write_text("poem\tThe cat sat on the mat.\nnews\tThe dog ran to the barn!\n" * 8, encoding="utf-8")
    config = RunConfig(model=ModelConfig(cell="gru", layers=1, hidden=8, label_dim=3),
                       data=DataConfig(labels="tsv"), train=TrainConfig(max_steps=3, batch_size=2, seq_len=8))
    return charrnn.train(corpus, config, out=root / "run").run_dir


def test_cli_exports_a_labelled_run(trained_labelled, tmp_path):
    out = tmp_path / "model.onnx"
    result = _invoke("export", trained_labelled, "--onnx", out, "--checkpoint", "latest")
    assert result.exit_code == 0, result.output
    run = charrnn.load(trained_labelled, "latest")
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    assert json.loads(meta["labels"]) == ["news", "poem"] == list(run.labels.names)
    assert json.loads(meta["label_counts"]) == list(run.labels.counts)
    tokens = np.array([[START] + list(run.vocab.encode("The cat"))], np.int32)
    model = nnx.merge(run.graphdef, run.params)
    _, ref = model(model.initial_carry(1), tokens, np.full_like(tokens, run.labels.id("poem")))
    h = np.zeros((1, 1, 8), np.float32)
    for t in range(tokens.shape[1]):
        feed = {"token": tokens[:, t].astype(np.int64), "h_in": h, "label_weights": np.array([[0.0, 1.0]], np.float32)}
        logits, h = sess.run(None, feed)
        np.testing.assert_allclose(logits, np.asarray(ref)[:, t], atol=1e-5, rtol=0)


def test_cli_refuses_an_existing_file_unless_forced(trained, tmp_path):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"keep me")
    assert_refused(_invoke("export", trained, "--onnx", out), "exists", "--force")
    assert out.read_bytes() == b"keep me"
    result = _invoke("export", trained, "--onnx", out, "--force")
    assert result.exit_code == 0, result.output
    onnx.checker.check_model(onnx.load(str(out)))


def test_cli_refuses_bad_requests_in_one_line(trained, tmp_path):
    assert_refused(_invoke("export", trained), "--onnx", "--html")
    assert_refused(_invoke("export", tmp_path / "no-such-run", "--onnx", tmp_path / "m.onnx"))
    assert_refused(_invoke("export", trained, "--onnx", tmp_path / "missing-dir" / "m.onnx"), "no directory")
    assert_refused(_invoke("export", trained, "--onnx", tmp_path), "directory")
    assert_refused(_invoke("export", trained, "--onnx", tmp_path / "x", "--html", tmp_path / "x"), "same file")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


def test_cli_without_onnx_names_the_extra(trained, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    assert_refused(_invoke("export", trained, "--onnx", tmp_path / "m.onnx"), "pip install", "export")
    assert list(tmp_path.iterdir()) == []


def test_cli_failed_write_keeps_the_old_file(trained, tmp_path, monkeypatch):
    from charrnn.export import onnx as onnx_export

    def half_write(run, path):
        Path(path).write_bytes(b"half")
        raise charrnn.CharrnnError("disk full")

    monkeypatch.setattr(onnx_export, "export_onnx", half_write)
    out = tmp_path / "model.onnx"
    out.write_bytes(b"old")
    assert_refused(_invoke("export", trained, "--onnx", out, "--force"), "disk full")
    assert out.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["model.onnx"]

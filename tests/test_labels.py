"""Labels (one model, many styles): the labelled input against the definition, the labelled
model, and reading labelled corpora.

The definition of a labelled first layer is ``charrnn.cells`` on the joined input
``x = [onehot(char); label_vec]``; every backend instead gathers ``w_ih``'s character row and
adds the label's precomputed term (``extra``), and must equal it in values and gradients.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import assert_matches_reference, assert_steps_match, two_styles

from charrnn import backends, cells, data, labels
from charrnn.backends import lstm_window, step_kernel, xla
from charrnn.config import GATES, DataConfig, ModelConfig, RunConfig
from charrnn.errors import CharrnnError
from charrnn.model import build_model, split_model
from charrnn.vocab import END, START, Vocab

T, B, H, V, D, L = 7, 5, 24, 11, 6, 3  # window, rows, hidden, vocabulary, label width, labels


# --- the labelled input against the definition --------------------------------------------

def _params(kind, seed=0):
    rng = np.random.default_rng(seed)
    g = GATES[kind] * H
    p = {"w_ih": rng.uniform(-0.4, 0.4, (V + D, g)), "w_hh": rng.uniform(-0.4, 0.4, (H, g)),
         "b_ih": rng.uniform(-0.3, 0.3, (g,))}
    if kind == "gru":
        p["b_hh"] = rng.uniform(-0.3, 0.3, (g,))
    p = {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}
    emb = jnp.asarray(rng.normal(size=(L, D)), jnp.float32)
    return p, emb


def _inputs(kind, seed=1):
    rng = np.random.default_rng(seed)
    carry = tuple(jnp.asarray(rng.uniform(-0.7, 0.7, (B, H)), jnp.float32) for _ in range(cells.state_size(kind)))
    x = rng.integers(0, V, (T, B)).astype(np.int32)
    keep = jnp.asarray((x != 0)[..., None].astype(np.float32))  # token 0 plays the start token
    lab = jnp.asarray(rng.integers(0, L, (T, B)).astype(np.int32))
    return carry, jnp.asarray(x), keep, lab


def _reference(kind, p, emb, carry, x, keep, lab):
    """The definition: the cell over ``[onehot(x); emb[label]]`` (dense input)."""
    joined = jnp.concatenate([jax.nn.one_hot(x, V, dtype=jnp.float32), jnp.take(emb, lab, axis=0)], axis=-1)
    return cells.layer(kind, p, carry, joined, keep, one_hot=False)


def _table(p, emb):
    return jnp.dot(emb, p["w_ih"][V:], precision=jax.lax.Precision.HIGHEST)


def _window_cases():
    cases = [("xla", kind, "float32") for kind in GATES] + [("xla", kind, "bfloat16") for kind in GATES]
    cases += [("chosen", kind, "float32") for kind in GATES]  # backends.layer: lstm_window where it serves
    if lstm_window.bf16_enabled():
        cases.append(("chosen", "lstm", "bfloat16"))
    return cases


@pytest.mark.parametrize("name, kind, dtype", _window_cases(), ids=lambda v: str(v))
def test_a_labelled_window_equals_the_joined_input_in_values_and_gradients(name, kind, dtype):
    p, emb = _params(kind)
    carry, x, keep, lab = _inputs(kind)
    dt = jnp.dtype(dtype)
    run = xla.layer if name == "xla" else backends.layer

    def labelled(p, emb, carry):
        extra = jnp.take(_table(p, emb), lab, axis=0)
        return run(kind, p, carry, x, keep, True, dt, extra)

    def reference(p, emb, carry):
        return _reference(kind, p, emb, carry, x, keep, lab)

    w_h = jnp.asarray(np.random.default_rng(7).normal(size=(T, B, H)), jnp.float32)

    def loss(f):
        def scalar(*a):
            final, h = f(*a)
            return jnp.sum(h * w_h) + sum(jnp.sum(c * (j + 1.5)) for j, c in enumerate(final))
        return scalar

    want, got = jax.jit(reference)(p, emb, carry), jax.jit(labelled)(p, emb, carry)
    want_g = jax.jit(jax.grad(loss(reference), argnums=(0, 1, 2)))(p, emb, carry)
    got_g = jax.jit(jax.grad(loss(labelled), argnums=(0, 1, 2)))(p, emb, carry)
    assert_matches_reference(got, want, got_g, want_g, dtype)


def _step_cases():
    return [("xla", kind) for kind in GATES] + ([("step_kernel", kind) for kind in GATES]
                                               if step_kernel.enabled() else [])


@pytest.mark.parametrize("name, kind", _step_cases(), ids=lambda v: str(v))
def test_labelled_sampling_steps_equal_the_joined_input(name, kind):
    (p0, emb), (p1, _) = _params(kind, 2), _params(kind, 3)
    rng = np.random.default_rng(4)
    p1 = dict(p1, w_ih=jnp.asarray(rng.uniform(-0.4, 0.4, (H, GATES[kind] * H)), jnp.float32))
    w_out = jnp.asarray(rng.uniform(-0.4, 0.4, (H, V)), jnp.float32)
    b_out = jnp.asarray(rng.uniform(-0.3, 0.3, (V,)), jnp.float32)
    tokens = rng.integers(2, V, (6, B)).astype(np.int32)
    mix = rng.dirichlet(np.ones(L), B).astype(np.float32)  # a label mix per row
    carry0 = tuple(tuple(jnp.zeros((B, H), jnp.float32) for _ in range(cells.state_size(kind))) for _ in "ab")

    def reference(carry, tokens):
        x = None
        for t in range(tokens.shape[0]):
            joined = jnp.concatenate([jax.nn.one_hot(tokens[t], V, dtype=jnp.float32), mix @ emb], axis=-1)
            c0 = cells.STEP[kind](p0, carry[0], jnp.dot(joined, p0["w_ih"], precision="highest"))
            c1 = cells.STEP[kind](p1, carry[1], c0[-1] @ p1["w_ih"])
            carry, x = (c0, c1), c1[-1]
        return carry, x @ w_out + b_out[None]

    if name == "xla":
        weights, step = xla.prepare_step(kind, [p0, p1], w_out, b_out), functools.partial(xla.step, kind)
    else:
        weights, step = step_kernel.prepare(kind, [p0, p1], w_out, b_out), step_kernel.step

    def run(carry, tokens):
        extra = jnp.dot(jnp.asarray(mix), _table(p0, emb), precision="highest")
        logits = None
        for t in range(tokens.shape[0]):
            carry, logits = step(weights, carry, tokens[t], extra_BxG=extra)
        return carry, logits

    want_carry, want_logits = jax.jit(reference)(carry0, tokens)
    got_carry, got_logits = jax.jit(run)(carry0, tokens)
    assert_steps_match(got_carry, got_logits, want_carry, want_logits)


# --- the labelled model --------------------------------------------------------------------

MV, MH = 13, 16


@functools.lru_cache(maxsize=None)
def _model(cell, num_labels):
    return split_model(build_model(ModelConfig(cell=cell, layers=2, hidden=MH, label_dim=5), MV, 0, num_labels))


def test_an_unlabelled_model_has_the_parameters_it_always_had():
    _, params = _model("lstm", 0)
    assert "label_embedding" not in params and params["cells"][0]["w_ih"].shape == (MV, 4 * MH)
    _, again = split_model(build_model(ModelConfig(cell="lstm", layers=2, hidden=MH, label_dim=5), MV, 0))
    _, default_dim = split_model(build_model(ModelConfig(cell="lstm", layers=2, hidden=MH), MV, 0))
    for a, b, c in zip(*(jax.tree_util.tree_leaves(x) for x in (params, again, default_dim))):
        assert np.array_equal(a, b) and np.array_equal(a, c)  # label_dim is read by labelled models only


def test_a_labelled_model_joins_the_label_vector_to_the_first_layer_input():
    _, params = _model("gru", 4)
    assert params["label_embedding"].shape == (4, 5)
    assert params["cells"][0]["w_ih"].shape == (MV + 5, 3 * MH)
    assert params["cells"][1]["w_ih"].shape == (MH, 3 * MH)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_the_window_equals_step_by_step_decoding_with_each_label(cell):
    graphdef, params = _model(cell, 3)
    rng = np.random.default_rng(0)
    tokens = np.concatenate([np.full((3, 1), START), rng.integers(2, MV, (3, 9))], axis=1).astype(np.int32)
    row_labels = np.array([2, 0, 1], np.int32)

    @jax.jit
    def window(params):
        model = nnx.merge(graphdef, params)
        labels_BxT = jnp.broadcast_to(jnp.asarray(row_labels)[:, None], tokens.shape)
        return model(model.initial_carry(3), jnp.asarray(tokens), labels_BxT)[1]

    @jax.jit
    def stepped(params):
        model = nnx.merge(graphdef, params)
        weights = model.step_weights()
        term = model.label_term(jax.nn.one_hot(row_labels, 3))
        carry, out = model.initial_carry(3), []
        for t in range(tokens.shape[1]):
            carry, logits = model.step_with(weights, carry, jnp.asarray(tokens[:, t]), label_term_BxG=term)
            out.append(logits)
        return jnp.stack(out, axis=1)

    want, got = np.asarray(window(params)), np.asarray(stepped(params))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    # The label matters: another label gives other logits.
    other = nnx.merge(graphdef, params)
    c = other.initial_carry(1)
    a = other.step(c, jnp.array([START]), label_weights_BxL=jnp.array([[1.0, 0, 0]]))[1]
    b = other.step(c, jnp.array([START]), label_weights_BxL=jnp.array([[0, 1.0, 0]]))[1]
    assert not np.allclose(a, b)


def test_a_label_mix_is_the_mixed_vector_through_the_label_rows():
    graphdef, params = _model("lstm", 3)
    model = nnx.merge(graphdef, params)
    w = jnp.array([[0.7, 0.3, 0.0], [0.0, 0.0, 1.0]])
    want = (w @ params["label_embedding"]) @ params["cells"][0]["w_ih"][MV:]
    np.testing.assert_allclose(np.asarray(model.label_term(w)), np.asarray(want), atol=1e-5, rtol=0)


def test_labels_and_models_must_agree():
    labelled, unlabelled = nnx.merge(*_model("rnn", 2)), nnx.merge(*_model("rnn", 0))
    tokens = jnp.zeros((1, 3), jnp.int32)
    with pytest.raises(CharrnnError, match="reads a label"):
        labelled(labelled.initial_carry(1), tokens)
    with pytest.raises(CharrnnError, match="has no labels"):
        unlabelled(unlabelled.initial_carry(1), tokens, jnp.zeros((1, 3), jnp.int32))
    with pytest.raises(CharrnnError, match="reads a label"):
        labelled.step(labelled.initial_carry(1), tokens[:, 0])


def test_the_label_parameters_get_gradients():
    graphdef, params = _model("lstm", 3)
    tokens = jnp.asarray(np.array([[START, 3, 4, 5, END]], np.int32))

    def loss(params):
        model = nnx.merge(graphdef, params)
        _, logits = model(model.initial_carry(1), tokens, jnp.full((1, 5), 1, jnp.int32))
        return jnp.sum(logits[:, :-1] * jax.nn.one_hot(tokens[:, 1:], MV))

    g = jax.tree_util.tree_map(np.asarray, jax.jit(jax.grad(loss))(params))
    assert np.abs(g["label_embedding"][1]).sum() > 0 and np.abs(g["label_embedding"][[0, 2]]).sum() == 0
    assert np.abs(g["cells"][0]["w_ih"][MV:]).sum() > 0


# --- configuration --------------------------------------------------------------------------

def test_the_config_fields_are_checked():
    assert DataConfig().labels == "none" and ModelConfig().label_dim == 16
    with pytest.raises(CharrnnError, match="--labels must be one of none, tsv, dirs"):
        DataConfig(labels="csv")
    with pytest.raises(CharrnnError, match="--label-dim must be in"):
        ModelConfig(label_dim=0)
    raw = RunConfig().to_dict()
    raw["data"]["labels"] = 3
    with pytest.raises(CharrnnError, match="field data.labels must be a string"):
        RunConfig.from_dict(raw)
    del raw["data"]["labels"], raw["model"]["label_dim"]  # a run from before labels reads as unlabelled
    assert RunConfig.from_dict(raw) == RunConfig()


# --- reading labelled corpora ---------------------------------------------------------------

def test_tsv_lines_are_documents_with_copy_escapes(tmp_path):
    path = tmp_path / "c.tsv"
    path.write_bytes(b"\xef\xbb\xbfpoem\troses\\nare red\\\\\\tblue\\q\r\n\nprose\tone\ttab\nprose\t\n")
    assert labels.read_tsv(path) == [("poem", "roses\nare red\\\tblueq"), ("prose", "one\ttab"), ("prose", "")]
    docs = labels.read_labelled(str(path), "tsv")
    assert docs.names == ("poem", "prose") and len(docs.texts) == 2  # the empty document is dropped


@pytest.mark.parametrize("text, why", [
    ("a\tfine\nno tab here\n", "line 2: no tab"),
    ("\tno label\n", "line 1: empty label"),
    ("a\tb\n  \tx\n", "line 2: empty label"),
    ("a\tends in \\\n", "line 1: the text ends in a lone backslash"),
])
def test_malformed_tsv_is_one_error_naming_file_and_line(tmp_path, text, why):
    path = tmp_path / "bad.tsv"
    path.write_text(text)
    with pytest.raises(CharrnnError, match=f"bad.tsv, {why}"):
        labels.read_labelled(str(path), "tsv")


def _dirs(tmp_path):
    root = tmp_path / "corpus"
    for label, files in {"upper": {"a.txt": "ABC\nDEF\n", "b.txt": "GHI"}, "digits": {"x.txt": "123\n456"}}.items():
        (root / label).mkdir(parents=True)
        for name, text in files.items():
            (root / label / name).write_text(text)
    return root


def test_label_directories_hold_documents_split_by_docs(tmp_path):
    root = _dirs(tmp_path)
    files = labels.read_labelled(str(root), "dirs")
    assert files.names == ("digits", "upper")
    assert sorted(zip(files.label_ids.tolist(), files.texts)) == [(0, "123\n456"), (1, "ABC\nDEF\n"), (1, "GHI")]
    lines = labels.read_labelled(str(root), "dirs", docs="line")
    assert sorted(lines.texts) == ["123", "456", "ABC", "DEF", "GHI"]


def test_malformed_label_directories_are_refused(tmp_path):
    root = _dirs(tmp_path)
    (root / "empty").mkdir()
    with pytest.raises(CharrnnError, match="label directory .*empty holds no text files"):
        labels.read_labelled(str(root), "dirs")
    (root / "empty").rmdir()
    (root / "README").write_text("x")
    with pytest.raises(CharrnnError, match="README: a --labels dirs directory holds one sub-directory per label"):
        labels.read_labelled(str(root), "dirs")
    with pytest.raises(CharrnnError, match="is not a directory"):
        labels.read_labelled(str(root / "README"), "dirs")
    with pytest.raises(CharrnnError, match="is not a file"):
        labels.read_labelled(str(root), "tsv")


def test_each_label_is_spread_over_the_stream():
    ids = np.array([0] * 8 + [1] * 4 + [2] * 2)
    order = labels.interleave(ids)
    assert sorted(order.tolist()) == list(range(14))
    assert ids[order].tolist() == [0, 1, 0, 2, 0, 1, 0, 0, 1, 0, 2, 0, 1, 0]
    assert all(np.all(np.diff(order[ids[order] == k]) > 0) for k in range(3))  # each label keeps its order
    # the last quarter (validation) holds about a quarter of each label's documents
    assert set(ids[order][-4:].tolist()) == {0, 1, 2}


def test_the_label_stream_is_aligned_with_the_token_stream(tmp_path):
    path = tmp_path / "c.tsv"
    path.write_text("b\txyz\na\tq\nb\tzz\na\tqqqq\n")
    docs = labels.read_labelled(str(path), "tsv")
    vocab = Vocab.from_texts(docs.texts)
    tokens = data.encode_corpus(docs.corpus(), "file", vocab).stream
    stream = docs.stream()
    assert stream.dtype == np.uint8 and stream.shape == tokens.shape
    for k, start in enumerate(np.flatnonzero(tokens == START)):
        text = vocab.decode(tokens[start:np.flatnonzero(tokens[start:] == END)[0] + start])
        assert docs.names[stream[start]] == ("a" if "q" in text else "b")
        assert len(set(stream[start:start + len(text) + 2].tolist())) == 1
    train = 7  # the first two documents start before token 7
    vocab_l = docs.vocab(train)
    assert vocab_l.counts == tuple(labels.document_counts(tokens, stream, 2, train).tolist())
    assert sum(vocab_l.counts) == 2
    out = tmp_path / "labels.npy"
    labels.save_stream(out, stream)
    assert np.array_equal(labels.load_stream(out, len(tokens), 2), stream)
    with pytest.raises(CharrnnError, match="labels for"):
        labels.load_stream(out, len(tokens) + 1, 2)
    with pytest.raises(CharrnnError, match="label id 1 for a run of 1 labels"):
        labels.load_stream(out, len(tokens), 1)
    # text read later (evaluation) maps to the run's ids; an unknown label is named
    run = labels.LabelVocab(("a", "b", "c"), (1, 1, 0))
    assert np.array_equal(docs.ids_in(run), docs.label_ids)
    with pytest.raises(CharrnnError, match="unknown label 'b' \\(the run knows: a, c\\)"):
        docs.ids_in(labels.LabelVocab(("a", "c"), (1, 1)))


def test_the_label_vocabulary_is_readable_json_checked_on_read():
    v = labels.LabelVocab(("JULIET", "ROMEO"), (3, 1))
    d = json.loads(v.to_json())
    assert d == {"format": 1, "labels": [{"name": "JULIET", "documents": 3}, {"name": "ROMEO", "documents": 1}]}
    assert labels.LabelVocab.from_json(v.to_json()) == v
    np.testing.assert_allclose(v.proportions(), [0.75, 0.25])
    for bad, why in [("[", "not valid JSON"), ('{"format": 2, "labels": []}', "format"),
                     ('{"format": 1, "labels": []}', "at least one label"),
                     ('{"format": 1, "labels": [{"name": "b", "documents": 1}, {"name": "a", "documents": 1}]}',
                      "sorted and unique"),
                     ('{"format": 1, "labels": [{"name": "a", "documents": -1}]}', "document count"),
                     ('{"format": 1, "labels": [{"name": "a"}]}', "list of"),
                     ('{"format": 1, "labels": [{"name": "", "documents": 1}]}', "empty label")]:
        with pytest.raises(CharrnnError, match=why):
            labels.LabelVocab.from_json(bad)


def test_label_mixes_are_parsed_and_unknown_labels_named():
    v = labels.LabelVocab(("a", "b", "c=d"), (1, 1, 1))
    assert v.weights("b").tolist() == [0, 1, 0]
    assert v.weights("c=d").tolist() == [0, 0, 1]
    np.testing.assert_allclose(v.weights("a=0.7, b=0.3"), [0.7, 0.3, 0])
    np.testing.assert_allclose(v.weights("a=2,c=d=2"), [0.5, 0, 0.5])
    for spec, why in [("x", "unknown label 'x' \\(known: a, b, c=d\\)"), ("a=1,x=1", "unknown label 'x'"),
                      ("a=-1", "must be a number >= 0"), ("a=nan", "must be a number >= 0"),
                      ("a=0,b=0", "must not all be 0"), ("a=1,a=2", "twice")]:
        with pytest.raises(CharrnnError, match=why):
            v.weights(spec)
    drawn = v.draw(np.random.default_rng(0), 3000)
    assert abs(np.mean(drawn == 0) - 1 / 3) < 0.05


# --- a labelled run end to end ----------------------------------------------------------------

_TRAINED = {}


def _train_styles(root, cell):
    """A tiny model trained on ``helpers.two_styles`` (each cell once per session: ~5-10 s)."""
    import charrnn
    from charrnn.config import TrainConfig

    if cell not in _TRAINED:
        corpus = two_styles(root / f"styles-{cell}.tsv")
        config = RunConfig(model=ModelConfig(cell=cell, layers=1, hidden=48, label_dim=4),
                           data=DataConfig(labels="tsv", val_frac=0.2),
                           train=TrainConfig(max_steps=150, batch_size=8, seq_len=32, lr=1e-2, eval_every=75))
        _TRAINED[cell] = charrnn.train(corpus, config, out=root / f"run-{cell}")
    return _TRAINED[cell]


@pytest.fixture(scope="module")
def styles_root(tmp_path_factory):
    _TRAINED.clear()
    return tmp_path_factory.mktemp("labelled")


@pytest.fixture
def labelled_run(styles_root):
    return _train_styles(styles_root, "gru"), styles_root


@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn"])
def test_samples_are_written_in_the_asked_style(styles_root, cell):
    """The proof: a model trained on two labelled corpora that differ obviously (upper-case
    letters, digits) writes each label's samples >= 95% in characters of its kind."""
    import charrnn

    run = charrnn.load(_train_styles(styles_root, cell).run_dir)
    assert run.labels.names == ("digits", "upper")
    for label, ok in (("upper", str.isupper), ("digits", str.isdigit)):
        samples = run.sample(label=label, num_samples=8, length=60, seed=1)
        text = "".join(s.text for s in samples)
        assert len(text) >= 8 * 15
        share = sum(map(ok, text)) / len(text)
        assert share >= 0.95, (label, share, text[:200])
        assert all(s.label == label for s in samples)


def test_a_labelled_run_keeps_its_labels_and_streams(labelled_run):
    result, _ = labelled_run
    run_dir = result.run_dir
    vocab = labels.LabelVocab.from_json((run_dir / labels.LABELS_FILE).read_text())
    assert vocab.names == ("digits", "upper") and sum(vocab.counts) > 0
    tokens = np.load(run_dir / "tokens.npy", mmap_mode="r")
    stream = labels.load_stream(run_dir / labels.STREAM_FILE, len(tokens), 2)
    assert stream.dtype == np.uint8
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r.get("event") == "eval"]
    assert evals and all(set(r["val_loss_by_label"]) == {"digits", "upper"} for r in evals)
    assert all(np.isfinite(r["val_loss"]) for r in evals)


def test_no_label_draws_labels_in_training_proportions_and_says_which(labelled_run):
    import charrnn

    result, _ = labelled_run
    run = charrnn.load(result.run_dir)
    samples = run.sample(num_samples=6, length=20, seed=3)
    assert {s.label for s in samples} <= {"digits", "upper"}
    assert [s.label for s in samples] == [s.label for s in run.sample(num_samples=6, length=20, seed=3)]
    mixed = run.sample(label="upper=0.5,digits=0.5", num_samples=2, length=10, seed=0)
    assert all(s.label == "upper=0.5,digits=0.5" for s in mixed)
    with pytest.raises(CharrnnError, match="unknown label 'poetry' \\(known: digits, upper\\)"):
        run.sample(label="poetry")


def test_the_cli_samples_and_evaluates_per_label(labelled_run):
    from click.testing import CliRunner

    from charrnn.cli import cli

    result, root = labelled_run
    runner = CliRunner()
    out = runner.invoke(cli, ["sample", str(result.run_dir), "--label", "digits", "-n", "2", "--length", "20",
                              "--seed", "0", "--json"])
    assert out.exit_code == 0, out.output
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["label"] for r in rows] == ["digits", "digits"]
    out = runner.invoke(cli, ["sample", str(result.run_dir), "--label", "poetry"])
    assert out.exit_code != 0 and "unknown label 'poetry' (known: digits, upper)" in out.output
    test = two_styles(root / "test.tsv", docs=6, seed=9)
    out = runner.invoke(cli, ["eval", str(result.run_dir), str(test), "--json"])
    assert out.exit_code == 0, out.output
    got = json.loads(out.stdout)
    assert set(got["labels"]) == {"digits", "upper"}
    assert got["chars"] == sum(r["chars"] for r in got["labels"].values())
    assert min(r["nats"] for r in got["labels"].values()) <= got["nats"] <= max(r["nats"] for r in got["labels"].values())


def test_the_cli_trains_on_label_directories_and_says_which_label_it_drew(tmp_path):
    from click.testing import CliRunner

    from charrnn.cli import cli

    root = _dirs(tmp_path)
    runner = CliRunner()
    out = runner.invoke(cli, ["train", str(root), "--labels", "dirs", "--docs", "line", "--cell", "rnn",
                              "--layers", "1", "--hidden", "8", "--label-dim", "3", "--batch-size", "2",
                              "--seq-len", "4", "--val-frac", "0", "--max-steps", "3", "--out", str(tmp_path / "run"),
                              "-q"])
    assert out.exit_code == 0, out.output
    vocab = labels.LabelVocab.from_json((tmp_path / "run" / labels.LABELS_FILE).read_text())
    assert vocab.names == ("digits", "upper") and vocab.counts == (2, 3)
    out = runner.invoke(cli, ["sample", str(tmp_path / "run"), "--length", "5", "--seed", "1"])
    assert out.exit_code == 0, out.output
    assert "charrnn: label " in out.stderr and "(drawn in the training proportions)" in out.stderr
    out = runner.invoke(cli, ["info", str(tmp_path / "run"), "--json"])
    assert out.exit_code == 0 and json.loads(out.stdout)["labels"] == {"digits": 2, "upper": 3}, out.output
    out = runner.invoke(cli, ["train", str(root), "--labels", "dirs", "--docs", "line", "--dry-run"])
    assert out.exit_code == 0 and json.loads(out.stdout)["tokens"] == 25, out.output
    out = runner.invoke(cli, ["train", str(root / "upper" / "a.txt"), "--labels", "tsv", "--out", str(tmp_path / "x")])
    assert out.exit_code != 0 and "a.txt, line 1: no tab" in out.output


def test_a_labelled_run_resumes_and_refuses_other_labels(tmp_path):
    import dataclasses

    import charrnn
    from charrnn.config import TrainConfig

    root = _dirs(tmp_path)
    config = RunConfig(model=ModelConfig(cell="lstm", layers=1, hidden=8, label_dim=3),
                       data=DataConfig(labels="dirs", docs="line", val_frac=0.0),
                       train=TrainConfig(max_steps=3, batch_size=2, seq_len=4, eval_every=3))
    charrnn.train(root, config, out=tmp_path / "run")
    more = dataclasses.replace(config, train=dataclasses.replace(config.train, max_steps=5))
    assert charrnn.train(root, more, out=tmp_path / "run", resume=True).step == 5
    plain = dataclasses.replace(more, data=DataConfig(docs="line", val_frac=0.0))
    with pytest.raises(CharrnnError, match="data.labels: run has 'dirs', asked for 'none'"):
        charrnn.train(root, plain, out=tmp_path / "run", resume=True)
    (root / "lower").mkdir()
    (root / "lower" / "l.txt").write_text("CBA\n")  # characters the run knows, a label it does not
    with pytest.raises(CharrnnError, match="its labels differ from the run's"):
        charrnn.train(root, more, out=tmp_path / "run", resume=True)

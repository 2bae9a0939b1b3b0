"""The HTML export (charrnn.export.html): one offline page whose JavaScript sampler is charrnn's.

The page's weights are checked without a browser; its sampler in real headless Chromium
(tests/browser.py; skipped with the reason where playwright or Chromium is missing): greedy
text equal to ``charrnn sample --greedy``'s for each cell kind, per-step logits equal to the
model's, errors shown on the page, and no request beyond the page itself.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest

import charrnn
from charrnn.config import DataConfig, ModelConfig, RunConfig, SampleConfig, TrainConfig
from charrnn.errors import CharrnnError
from charrnn.export.html import decode_tensor, write_html
from charrnn.vocab import START

from browser import chromium_page, file_url, record_requests

# Three documents (``--docs line``): a tiny model learns them well enough that its greedy
# continuations are confident, end at the end token, and leave no near-ties in the argmax.
LINES = "the cat sat on the mat.\nthe dog ran to the barn!\na bird sang in the tree.\n" * 10


@pytest.fixture(scope="module", params=["rnn", "lstm", "gru"])
def trained(request, tmp_path_factory):
    """``(run, page_path)``: a 2-layer model of ``LINES`` for each cell kind, exported."""
    root = tmp_path_factory.mktemp(f"html-{request.param}")
    corpus = root / "lines.txt"
    corpus.write_text(LINES, encoding="utf-8")
    config = RunConfig(model=ModelConfig(cell=request.param, layers=2, hidden=32),
                       data=DataConfig(docs="line", val_frac=0.0),
                       train=TrainConfig(max_steps=150, batch_size=8, seq_len=32, lr=1e-2))
    result = charrnn.train(corpus, config, out=root / "run")
    run = charrnn.load(result.run_dir)
    return run, write_html(run, root / "demo.html")


def embedded_model(page_text: str) -> dict:
    match = re.search(r'<script type="application/json" id="model">(.*?)</script>', page_text, re.S)
    assert match, "the page has no embedded model"
    return json.loads(match.group(1))


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs = []

    def handle_starttag(self, tag, attrs):
        self.refs += [(tag, name, value) for name, value in attrs if name in ("src", "href", "action")]


def test_page_embeds_the_weights_and_vocabulary(trained):
    run, path = trained
    model = embedded_model(path.read_text(encoding="utf-8"))
    m = run.config.model
    assert (model["cell"], model["layers"], model["hidden"]) == (m.cell, m.layers, m.hidden)
    assert model["chars"] == list(run.vocab.chars)
    assert (model["start_id"], model["end_id"], model["first_char_id"]) == (0, 1, 2)
    expected = {"w_out": run.params["w_out"], "b_out": run.params["b_out"]}
    for layer in range(m.layers):
        for name, value in run.params["cells"][layer].items():
            expected[f"cells.{layer}.{name}"] = value
    assert sorted(model["tensors"]) == sorted(expected)
    for name, value in expected.items():
        decoded = decode_tensor(model["tensors"][name])
        assert decoded.dtype == np.float32
        np.testing.assert_array_equal(decoded, np.asarray(value), err_msg=name)


def test_page_is_one_file_with_nothing_external(trained):
    _, path = trained
    text = path.read_text(encoding="utf-8")
    links = _Links()
    links.feed(text)
    assert all(value.startswith(("data:", "#")) for _, _, value in links.refs), links.refs
    assert "http://" not in text and "https://" not in text
    assert "Content-Security-Policy" in text  # the browser itself refuses any request


def test_write_html_refuses_a_missing_directory(trained, tmp_path):
    run, _ = trained
    with pytest.raises(CharrnnError, match="does not exist"):
        write_html(run, tmp_path / "no" / "demo.html")
    assert not (tmp_path / "no").exists()


def _generate(page, prime: str, length: int, greedy: bool = True, seed: str = "", top_p: str = "1") -> str:
    page.fill("#prime", prime)
    page.set_checked("#greedy", greedy)
    page.fill("#length", str(length))
    page.fill("#seed", seed)
    page.fill("#top-p", top_p)
    page.evaluate("document.getElementById('status').dataset.state = 'idle'")  # not the last run's
    page.click("#generate")
    page.wait_for_selector("#status[data-state=done], #status[data-state=error]")
    assert page.get_attribute("#status", "data-state") == "done", page.text_content("#status")
    return page.text_content("#output")


def open_page(page, path) -> tuple[list, list]:
    """Open the exported page; returns the URLs it requests and the script errors it raises."""
    requests = record_requests(page)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(file_url(path))
    return requests, errors


@pytest.mark.slow  # a real browser (a Chromium subprocess)
def test_page_in_chromium_matches_charrnn(trained):
    run, path = trained
    with chromium_page() as page:
        requests, errors = open_page(page, path)

        # Greedy text equals charrnn's, whether it stops at the end token or at the length.
        for prime, length in [("the d", 60), ("a b", 6), ("", 60)]:
            expected = run.sample(SampleConfig(greedy=True, prime=prime, length=length))[0].text
            assert _generate(page, prime, length) == expected, (prime, length)

        # The network step for step: logits as the model computes them over a whole document.
        tokens = np.concatenate([[START], run.vocab.encode("the dog ran to the barn!")]).astype(np.int32)
        js_TxV = np.array(page.evaluate(
            "(tokens) => { const s = charrnnDemo.zeroState(); "
            "return tokens.map((t) => Array.from(charrnnDemo.step(s, t))); }", tokens.tolist()))
        from flax import nnx
        model = nnx.merge(run.graphdef, run.params)
        _, logits_BxTxV = model(model.initial_carry(1), tokens[None, :])
        np.testing.assert_allclose(js_TxV, np.asarray(logits_BxTxV[0]), rtol=1e-6, atol=1e-5)

        # Sampling: seeded, so the same settings give the same text; only known characters.
        # (0.83 is off the input's step: the page's own checks decide, not the browser's.)
        page.fill("#temperature", "0.83")
        first = _generate(page, "the ", 80, greedy=False, seed="7", top_p="0.9")
        assert first.startswith("the ") and set(first) <= set(run.vocab.chars)
        assert _generate(page, "the ", 80, greedy=False, seed="7", top_p="0.9") == first

        # A prime with characters the model never saw: a visible message, no output.
        page.fill("#prime", "the Q")
        page.evaluate("document.getElementById('status').dataset.state = 'idle'")
        page.click("#generate")
        page.wait_for_selector("#status[data-state=error]")
        assert "'Q'" in page.text_content("#status").replace('"', "'")
        assert page.text_content("#output") == ""
        page.fill("#prime", "the ")
        page.fill("#length", "0")
        page.evaluate("document.getElementById('status').dataset.state = 'idle'")
        page.click("#generate")
        page.wait_for_selector("#status[data-state=error]")
        assert "Length" in page.text_content("#status")

        assert errors == []
        assert requests == [file_url(path)], "the page made a request of its own"


# --- a labelled run ----------------------------------------------------------------------------

# Two labels whose documents part after "the ": the label alone decides the greedy text. "dog"
# has more documents, so the page's default label is not simply the first.
LABELLED = "cat\tthe cat sat on the mat.\n" * 6 + "dog\tthe dog ran to the barn!\n" * 12


@pytest.fixture(scope="module", params=["rnn", "lstm", "gru"])
def labelled(request, tmp_path_factory):
    """``(run, page_path)``: a labelled model of ``LABELLED`` for each cell kind, exported by the CLI."""
    from click.testing import CliRunner

    from charrnn.cli import cli

    root = tmp_path_factory.mktemp(f"html-labelled-{request.param}")
    corpus = root / "labelled.tsv"
    corpus.write_text(LABELLED, encoding="utf-8")
    config = RunConfig(model=ModelConfig(cell=request.param, layers=2, hidden=32, label_dim=4),
                       data=DataConfig(labels="tsv", val_frac=0.0),
                       train=TrainConfig(max_steps=150, batch_size=8, seq_len=32, lr=1e-2))
    run_dir = charrnn.train(corpus, config, out=root / "run").run_dir
    result = CliRunner().invoke(cli, ["export", str(run_dir), "--html", str(root / "demo.html")])
    assert result.exit_code == 0, result.output
    return charrnn.load(run_dir), root / "demo.html"


def test_labelled_page_embeds_the_labels_and_their_term(labelled):
    from flax import nnx

    run, path = labelled
    model = embedded_model(path.read_text(encoding="utf-8"))
    assert model["labels"] == {"names": ["cat", "dog"], "counts": [6, 12], "default": 1}
    table = np.asarray(nnx.merge(run.graphdef, run.params).label_table())
    assert table.shape == (2, {"rnn": 1, "lstm": 4, "gru": 3}[run.config.model.cell] * 32)
    np.testing.assert_array_equal(decode_tensor(model["tensors"]["label_table"]), table)
    # Layer 0's label rows are folded into the table: the page keeps only the character rows.
    w_ih = np.asarray(run.params["cells"][0]["w_ih"])
    np.testing.assert_array_equal(decode_tensor(model["tensors"]["cells.0.w_ih"]), w_ih[:run.vocab.size])
    assert "2 labels" in path.read_text(encoding="utf-8")


def test_unlabelled_page_has_no_labels(trained):
    _, path = trained
    model = embedded_model(path.read_text(encoding="utf-8"))
    assert "labels" not in model and "label_table" not in model["tensors"]


def _cli_greedy(run, prime: str, length: int, label: str) -> str:
    """``charrnn sample --greedy --label LABEL``'s text, through the CLI itself."""
    from click.testing import CliRunner

    from charrnn.cli import cli

    result = CliRunner().invoke(cli, ["sample", str(run.run_dir), "--greedy", "--json", "--prime", prime,
                                      "--length", str(length), "--label", label])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.splitlines()[-1])["text"]


@pytest.mark.slow  # a real browser (a Chromium subprocess)
def test_labelled_page_in_chromium_matches_charrnn(labelled):
    run, path = labelled
    with chromium_page() as page:
        requests, errors = open_page(page, path)

        # The picker: every label, the most frequent chosen.
        assert page.is_visible("#label")
        options = page.eval_on_selector_all("#label option", "(os) => os.map((o) => [o.value, o.textContent])")
        assert [value for value, _ in options] == ["0", "1"]
        assert [text.split(" ")[0] for _, text in options] == ["cat", "dog"]
        assert page.input_value("#label") == "1"

        # Greedy text for each label equals `charrnn sample --greedy --label L`, and differs by label.
        texts = {}
        for label in ("dog", "cat"):
            page.select_option("#label", label=next(t for _, t in options if t.startswith(label + " ")))
            for prime, length in [("the ", 40), ("", 40)]:
                expected = _cli_greedy(run, prime, length, label)
                assert expected == run.sample(SampleConfig(greedy=True, prime=prime, length=length,
                                                           label=label))[0].text
                texts[label, prime] = _generate(page, prime, length)
                assert texts[label, prime] == expected, (label, prime)
            assert f"label {label}" in page.text_content("#status")
        assert texts["cat", "the "] != texts["dog", "the "]

        # The network step for step under each label: the model's logits over a whole document.
        from flax import nnx
        model = nnx.merge(run.graphdef, run.params)
        tokens = np.concatenate([[START], run.vocab.encode("the dog ran to the barn!")]).astype(np.int32)
        for index in (0, 1):
            js_TxV = np.array(page.evaluate(
                "([tokens, index]) => { const s = charrnnDemo.zeroState(), term = charrnnDemo.labelTerm(index); "
                "return tokens.map((t) => Array.from(charrnnDemo.step(s, t, term))); }", [tokens.tolist(), index]))
            _, logits_BxTxV = model(model.initial_carry(1), tokens[None, :], np.full((1, len(tokens)), index))
            np.testing.assert_allclose(js_TxV, np.asarray(logits_BxTxV[0]), rtol=1e-6, atol=1e-5)

        assert errors == []
        assert requests == [file_url(path)], "the page made a request of its own"


@pytest.mark.slow  # a real browser (a Chromium subprocess)
def test_unlabelled_page_shows_no_label_picker(trained):
    _, path = trained
    with chromium_page() as page:
        page.goto(file_url(path))
        assert not page.is_visible("#label-picker")

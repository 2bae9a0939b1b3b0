"""HTML export: one self-contained web page that samples from a run in the browser.

The page carries the weights inline (base64 of little-endian float32, row-major), the vocabulary
and the special ids, and a small JavaScript sampler for the run's cell kind that follows
``charrnn.model``'s equations in float32 (``Float32Array`` storage, ``Math.fround`` on every
product and sum, sums over the input in index order), so its greedy text is
``charrnn sample --greedy``'s. It needs no network and no library: a Content-Security-Policy
forbids every request, and the page can be opened straight from disk.

A labelled run's page also carries its labels (names, training counts, the most frequent as the
default) and ``label_table``, each label's term in the first layer's gates
(``CharRNN.label_table``); a picker chooses the label and the sampler adds its row to the first
layer's input, as ``charrnn sample --label`` does.
"""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path

import numpy as np

from charrnn.errors import CharrnnError
from charrnn.vocab import END, NUM_SPECIAL, START

TEMPLATE = Path(__file__).with_name("demo_template.html")
MODEL_FORMAT = 1  # of the JSON the page embeds (``model_json``)


def encode_tensor(array) -> dict:
    """``{"shape": [...], "data": base64}`` of ``array`` as little-endian float32, row-major."""
    a = np.ascontiguousarray(np.asarray(array), dtype="<f4")
    return {"shape": list(a.shape), "data": base64.b64encode(a.tobytes()).decode("ascii")}


def decode_tensor(entry: dict) -> np.ndarray:
    """The array ``encode_tensor`` encoded (float32)."""
    data = np.frombuffer(base64.b64decode(entry["data"]), dtype="<f4")
    return data.reshape(entry["shape"]).astype(np.float32)


def model_json(run) -> dict:
    """What the page's sampler reads: the model's shape, vocabulary, special ids and tensors.

    Tensors are named ``cells.<layer>.<w_ih|w_hh|b_ih|b_hh>``, ``w_out`` and ``b_out`` (``b_hh``
    for the GRU only: the other cells fold it into ``b_ih``); layer 0's ``w_ih`` rows are the
    token ids (its input is one-hot). A labelled run adds ``labels`` (``names``, ``counts``,
    ``default``: the index of the most frequent) and the ``label_table`` tensor ``(labels, G)``,
    which stands for layer 0's label rows of ``w_ih`` (left out).
    """
    m = run.config.model
    params = run.params
    V = run.vocab.size
    tensors = {}
    for layer in range(m.layers):
        cell = params["cells"][layer]
        for name in ("w_ih", "w_hh", "b_ih", "b_hh"):
            if name in cell:
                value = cell[name][:V] if layer == 0 and name == "w_ih" else cell[name]
                tensors[f"cells.{layer}.{name}"] = encode_tensor(value)
    tensors["w_out"] = encode_tensor(params["w_out"])
    tensors["b_out"] = encode_tensor(params["b_out"])
    spec = {"format": MODEL_FORMAT, "cell": m.cell, "layers": m.layers, "hidden": m.hidden,
            "start_id": START, "end_id": END, "first_char_id": NUM_SPECIAL,
            "chars": list(run.vocab.chars), "tensors": tensors}
    if run.labels is not None:
        spec["labels"] = _labels_json(run.labels)
        tensors["label_table"] = encode_tensor(run.label_table())
    return spec


def _labels_json(labels) -> dict:
    return {"names": list(labels.names), "counts": list(labels.counts), "default": labels.most_frequent}


def _script_safe(text: str) -> str:
    # Inside <script> only "</" (and "<!--") can end or confuse the element; JSON allows "\u003c".
    return text.replace("<", "\\u003c")


def render_html(run) -> str:
    """The page's text for ``run`` (a ``charrnn.load`` result)."""
    m = run.config.model
    name = Path(run.run_dir).name
    about = f"A {m.layers}-layer {m.cell.upper()} with {m.hidden} units, {run.vocab.size - NUM_SPECIAL} characters"
    if run.labels is not None:
        about += f", {run.labels.size} label{'s' if run.labels.size > 1 else ''}"
    about += f", trained {run.step:,} steps." if run.step else "."
    page = TEMPLATE.read_text(encoding="utf-8")
    # The model goes in last: nothing inside it is mistaken for a placeholder.
    page = page.replace("@@TITLE@@", html.escape(name)).replace("@@ABOUT@@", html.escape(about))
    return page.replace("@@MODEL@@", _script_safe(json.dumps(model_json(run), separators=(",", ":"))))


def write_html(run, path) -> Path:
    """Write the demo page for ``run`` (a ``charrnn.load`` result) to ``path``; returns the path.

    The page is one file that works offline: weights inline, a JavaScript sampler for the run's
    cell kind, and prime / temperature / top-p / length / seed / greedy controls (and a label
    picker for a labelled run).
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise CharrnnError(f"cannot write {path}: the directory {path.parent} does not exist")
    if path.is_dir():
        raise CharrnnError(f"cannot write {path}: it is a directory")
    text = render_html(run)
    # Written beside the target and renamed: a failed export never leaves half a page behind.
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CharrnnError(f"cannot write {path}: {e.strerror or e}") from None
    return path

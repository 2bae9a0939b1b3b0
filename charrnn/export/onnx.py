"""ONNX export: one step of a run's network as standard ONNX operators, its state as inputs and outputs.

The graph reads one token per row and the recurrent state of every layer, and returns the next
character's logits and the new state, so any ONNX runtime (Python, C#, Java, JavaScript, mobile)
can sample by feeding each step's state back. Inside: the state is reset to zero on rows whose
token is the start id (as charrnn's model does wherever it reads a start token); the one-hot
input is a ``Gather`` of identity rows; each layer is ONNX's own ``RNN`` / ``LSTM`` / ``GRU``
operator over a sequence of length 1; the output layer is a ``Gemm``. The vocabulary and the
special ids travel in the model's metadata (``metadata_props``).

A labelled run's graph also reads ``label_weights`` (float32 ``[batch, labels]``: one-hot for one
label, a mix summing to 1 otherwise). Joined to the one-hot input, ``x = [onehot; weights]``, it
meets ``W = [w_ih[:V]; label_table]`` in the first layer, so ``x @ W = w_ih[c] + weights @
label_table``: the model's own label term (``CharRNN.label_term``), added to the first layer's
gates. The label names, their order and training counts travel in the metadata.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from charrnn.errors import CharrnnError
from charrnn.vocab import END, START

# Opset 17 (ONNX 1.12, 2022): every operator used here has had its present form since opset 14,
# and runtimes of that age (onnxruntime >= 1.12, onnxruntime-web, mobile builds) read it.
OPSET = 17
# ONNX's recurrent operators order their gate blocks differently from charrnn (which uses
# PyTorch's order): for each ONNX block, the charrnn block that goes there.
#   LSTM: ONNX i, o, f, c  <- charrnn i, f, g, o      GRU: ONNX z, r, h  <- charrnn r, z, n
_GATE_ORDER = {"rnn": (0,), "lstm": (0, 3, 1, 2), "gru": (1, 0, 2)}
_OPERATOR = {"rnn": "RNN", "lstm": "LSTM", "gru": "GRU"}
# Past this size a protobuf cannot be serialised as one file (ONNX would need external data).
_MAX_BYTES = 2**31 - 2**24

USAGE = ("Feed token (int64 [batch]) with h_in (float32 [layers, batch, hidden]; c_in too for an "
         "LSTM), zeros at first; each step returns logits [batch, vocab] and h_out (c_out) to feed "
         "back; start each text with start_id (it resets the state); id 2+i is vocabulary[i]; "
         "stop at end_id.")
LABEL_USAGE = (" Labelled: feed label_weights (float32 [batch, labels]) at every step, one-hot of a label "
               "in the order of the labels metadata, or a mix summing to 1.")


def _onnx():
    try:
        import onnx
    except ImportError:
        raise CharrnnError("ONNX export needs the onnx package: pip install 'charrnn[export]'") from None
    return onnx


def check_installed() -> None:
    """Raise ``CharrnnError`` naming the extra to install when the ``onnx`` package is missing."""
    _onnx()


def _reorder(x, gates: int, kind: str):
    """``x``'s gate blocks along its last axis in ONNX's order for ``kind``."""
    blocks = np.split(x, gates, axis=-1)
    return np.concatenate([blocks[k] for k in _GATE_ORDER[kind]], axis=-1)


def _host(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def _json_text(strings) -> str:
    """A JSON list of ``strings``, readable where UTF-8 allows it."""
    text = json.dumps(list(strings), ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (text read with surrogatepass): escape it
        text = json.dumps(list(strings))
    return text


def metadata(run) -> dict[str, str]:
    """The ``metadata_props`` of ``run``'s ONNX model: what a sampler needs besides the graph."""
    from charrnn import __version__

    m = run.config.model
    props = {"vocabulary": _json_text(run.vocab.chars),
             "start_id": str(START), "end_id": str(END), "cell": m.cell, "layers": str(m.layers),
             "hidden": str(m.hidden), "charrnn_version": __version__, "usage": USAGE}
    if run.labels is not None:
        props.update(labels=_json_text(run.labels.names),
                     label_counts=json.dumps(list(run.labels.counts)), usage=USAGE + LABEL_USAGE)
    return props


def build_onnx(run):
    """``run``'s network as an ``onnx.ModelProto`` of one step (see the module docstring).

    Args:
        run: a loaded run (``charrnn.load``): its ``config.model``, ``vocab``, ``params`` and
            ``labels`` (a labelled run's graph also reads ``label_weights``).
    Returns:
        The model, already checked by ``onnx.checker`` (full check, with shape inference).
    Raises:
        CharrnnError: without the ``onnx`` package, or for a model too large for one file.
    """
    onnx = _onnx()
    from onnx import TensorProto, helper, numpy_helper

    m = run.config.model
    kind, L, H, V = m.cell, m.layers, m.hidden, run.vocab.size
    if kind not in _OPERATOR:
        raise CharrnnError(f"ONNX export: unknown cell kind {kind!r}")
    gates, lstm = len(_GATE_ORDER[kind]), kind == "lstm"
    cells = run.params["cells"]
    cells = [cells[i] for i in range(L)]  # a list, or a dict keyed by layer index
    labelled = run.labels is not None
    num_labels = run.labels.size if labelled else 0
    size = 4 * (sum(np.size(a) for c in cells for a in c.values()) + (H + 1) * V + num_labels * gates * H) + V * V
    if size > _MAX_BYTES:
        raise CharrnnError(f"ONNX export: the model needs {size / 2**30:.1f} GiB, over protobuf's 2 GiB "
                           "limit for one file")

    initializers, nodes = [], []

    def const(name: str, array) -> str:
        initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(op: str, inputs: list, outputs: list, **attrs) -> list:
        nodes.append(helper.make_node(op, inputs, outputs, **attrs))
        return outputs

    axis0 = const("axis_0", np.array([0], np.int64))
    states = ["h", "c"] if lstm else ["h"]

    # Reset: rows reading the start token begin from the zero state, as charrnn's model does.
    node("Equal", ["token", const("start_id", np.array(START, np.int64))], ["is_start_B"])
    node("Unsqueeze", ["is_start_B", const("axes_0_2", np.array([0, 2], np.int64))], ["is_start_1xBx1"])
    zero = const("zero", np.zeros((), np.float32))
    per_layer = {}
    for s in states:
        node("Where", ["is_start_1xBx1", zero, f"{s}_in"], [f"{s}_reset_LxBxH"])
        names = [f"{s}_reset_{i}" for i in range(L)]
        if L > 1:
            per_layer[s] = node("Split", [f"{s}_reset_LxBxH"], names, axis=0)  # [1, batch, H] each
        else:
            per_layer[s] = node("Identity", [f"{s}_reset_LxBxH"], names)

    # One-hot input: rows of a boolean identity (a float one would be 4x larger: 144 MB for a
    # vocabulary of 6,000 characters), cast to float, as a sequence of length 1.
    node("Gather", [const("one_hot_rows", np.eye(V, dtype=bool)), "token"], ["one_hot_bool_BxV"], axis=0)
    node("Cast", ["one_hot_bool_BxV"], ["one_hot_BxV"], to=TensorProto.FLOAT)
    x_BxI = "one_hot_BxV"
    if labelled:  # x = [onehot; label_weights]: W's extra rows are the label table (module docstring)
        x_BxI = node("Concat", ["one_hot_BxV", "label_weights"], ["x_BxVL"], axis=1)[0]
    x = node("Unsqueeze", [x_BxI, axis0], ["x_1xBxI"])[0]

    tops = {s: [] for s in states}
    for i, p in enumerate(cells):
        # charrnn keeps x @ w_ih (in, G); ONNX wants W [1, G, in] with x @ W^T. For RNN and LSTM
        # b_ih already holds both biases, so ONNX's recurrent bias Rb is zero; the GRU needs its
        # own b_hh (it is scaled by r inside the candidate: linear_before_reset=1, PyTorch's GRU).
        w_ih = _host(p["w_ih"])
        if i == 0 and labelled:
            w_ih = np.concatenate([w_ih[:V], run.label_table()])
        w = _reorder(w_ih, gates, kind).T[None]
        r = _reorder(_host(p["w_hh"]), gates, kind).T[None]
        b_hh = _host(p["b_hh"]) if "b_hh" in p else np.zeros(gates * H, np.float32)
        b = np.concatenate([_reorder(_host(p["b_ih"]), gates, kind), _reorder(b_hh, gates, kind)])[None]
        inputs = [x, const(f"W_{i}", w), const(f"R_{i}", r), const(f"B_{i}", b), "", per_layer["h"][i]]
        outputs = ["", f"h_{i}"]
        if lstm:
            inputs.append(per_layer["c"][i])
            outputs.append(f"c_{i}")
        attrs = {"linear_before_reset": 1} if kind == "gru" else {}
        node(_OPERATOR[kind], inputs, outputs, name=f"layer_{i}", hidden_size=H, **attrs)
        for s in states:
            tops[s].append(f"{s}_{i}")
        x = f"h_{i}"  # Y_h, [1, batch, H]: also the next layer's sequence of length 1

    for s in states:
        node("Concat", tops[s], [f"{s}_out"], axis=0)
    node("Squeeze", [x, axis0], ["top_BxH"])
    w_out, b_out = const("w_out", _host(run.params["w_out"])), const("b_out", _host(run.params["b_out"]))
    node("Gemm", ["top_BxH", w_out, b_out], ["logits"])

    state_shape = [L, "batch", H]
    inputs = [helper.make_tensor_value_info("token", TensorProto.INT64, ["batch"])]
    inputs += [helper.make_tensor_value_info(f"{s}_in", TensorProto.FLOAT, state_shape) for s in states]
    if labelled:
        inputs.append(helper.make_tensor_value_info("label_weights", TensorProto.FLOAT, ["batch", num_labels]))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", V])]
    outputs += [helper.make_tensor_value_info(f"{s}_out", TensorProto.FLOAT, state_shape) for s in states]
    graph = helper.make_graph(nodes, f"charrnn_{kind}_{L}x{H}_step", inputs, outputs, initializers)
    props = metadata(run)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="charrnn", producer_version=props["charrnn_version"],
                              doc_string=f"charrnn {kind} {L}x{H}, vocabulary {V}: one step. {props['usage']}")
    helper.set_model_props(model, props)
    onnx.checker.check_model(model, full_check=True)
    return model


def export_onnx(run, path) -> Path:
    """Write ``run``'s network as an ONNX model of one step to ``path`` (see ``build_onnx``).

    Returns ``path``. The file is written in place; the CLI writes to a temporary file first.
    """
    onnx = _onnx()
    model = build_onnx(run)
    path = Path(path)
    onnx.save_model(model, str(path))
    return path

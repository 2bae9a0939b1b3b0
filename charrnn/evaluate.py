"""Validation loss over a whole token stream, compiled once per window shape; a loaded run's
loss on a text (``Run.evaluate``, ``Run.evaluate_labelled``)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from charrnn import batches
from charrnn import data as data_mod
from charrnn import labels as labels_mod
from charrnn.config import check_argument
from charrnn.errors import CharrnnError
from charrnn.vocab import Vocab, describe_chars

if TYPE_CHECKING:
    from charrnn.inference import Run

EVAL_CHUNK = 8  # validation windows per device dispatch
# Characters each validation row reads, unscored, before its own part. Without them each of
# the rows starts from an empty state and the loss grew with the row count: a GRU 2x384 read
# as one stream 1.4705 nats/char, in 64 rows 1.4749, in 128 rows 1.4791; 25 characters ahead
# of each row 1.4708, 50 to 400 characters 1.4704-1.4705.
EVAL_WARMUP = 100


def compute_dtype(name: str):
    return jnp.bfloat16 if name == "bfloat16" else jnp.float32


def weighted_nll(logits_BxTxV, targets_BxT, weight_BxT):
    """Sum of ``weight``-masked cross-entropies (nats) and the sum of the weights."""
    nll_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT)
    return jnp.sum(nll_BxT * weight_BxT), jnp.sum(weight_BxT)


def make_eval_fn(graphdef, dtype_name: str = "float32", num_labels: int = 0):
    """Build ``eval_chunk(params, carry, x_KxBxT, y_KxBxT, w_KxBxT) -> (carry, nll_sum, count)``.

    A labelled model's (``num_labels`` > 0) takes the inputs' labels ``l_KxBxT`` too and
    returns the sums per label, ``(num_labels,)`` each."""
    dtype = compute_dtype(dtype_name)

    @jax.jit
    def eval_chunk(params, carry, x_KxBxT, y_KxBxT, w_KxBxT, l_KxBxT=None):
        model = nnx.merge(graphdef, params)

        def body(c, window):
            x, y, w, lab = window
            c, logits = model(c, x, lab, dtype=dtype)
            if lab is None:
                return c, weighted_nll(logits, y, w)
            nll_BxT = optax.softmax_cross_entropy_with_integer_labels(logits, y) * w
            ids = jnp.clip(lab, 0, num_labels - 1).reshape(-1)  # padding (weight 0) may hold any id
            return c, (jax.ops.segment_sum(nll_BxT.reshape(-1), ids, num_labels),
                       jax.ops.segment_sum(w.reshape(-1), ids, num_labels))

        carry, (totals, counts) = jax.lax.scan(body, carry, (x_KxBxT, y_KxBxT, w_KxBxT, l_KxBxT))
        return carry, jnp.sum(totals, axis=0), jnp.sum(counts, axis=0)

    return eval_chunk


def _losses(total: float, count: float) -> dict:
    if count == 0:
        return {"nats": float("nan"), "bits": float("nan"), "chars": 0}
    nats = total / count
    return {"nats": nats, "bits": nats / math.log(2), "chars": int(count)}


def evaluate_stream(model_graphdef, params, initial_carry_fn, stream: np.ndarray, *, num_streams: int,
                    seq_len: int, eval_fn=None, warmup: int = EVAL_WARMUP,
                    should_stop: Optional[Callable[[], Optional[str]]] = None,
                    labels: Optional[np.ndarray] = None, num_labels: int = 0) -> Optional[dict[str, float]]:
    """Mean loss over every scored target of ``stream`` (nats and bits per character).

    A labelled model reads ``labels`` (the label of every token of ``stream``; ``eval_fn`` from
    ``make_eval_fn(..., num_labels)``) and the result adds ``"by_label"``: the loss of each
    label's characters, a list indexed by label id.

    The stream is read as ``num_streams`` contiguous rows with the state carried across windows,
    each row first reading (unscored) the ``warmup`` characters before it, so every character
    is predicted from its row's history and at least ``warmup`` characters before it.

    ``should_stop`` is polled between chunks (one chunk runs ahead of the host, so a stop comes
    within about one chunk's time); when it answers, the evaluation is abandoned: None.
    """
    eval_fn = eval_fn or make_eval_fn(model_graphdef, num_labels=num_labels if labels is not None else 0)
    num_streams = max(1, min(num_streams, (len(stream) - 1) // max(seq_len, 1) or 1))
    carry = initial_carry_fn(num_streams)
    sums = []
    windows = batches.eval_windows(stream, num_streams, seq_len, EVAL_CHUNK, warmup)
    # The label windows hold each input's label at the inputs' places (their targets unused).
    label_windows = (batches.eval_windows(labels, num_streams, seq_len, EVAL_CHUNK, warmup)
                     if labels is not None else None)
    for x, y, w in windows:
        if should_stop is not None:
            if sums:
                jax.block_until_ready(sums[-1])  # at most one chunk queued behind the host
            if should_stop() is not None:
                return None
        if label_windows is None:
            carry, t, c = eval_fn(params, carry, x, y, w)
        else:
            carry, t, c = eval_fn(params, carry, x, y, w, next(label_windows)[0])
        sums.append((t, c))
    total, count = 0.0, 0.0
    for t, c in jax.device_get(sums):
        total += np.asarray(t, np.float64)
        count += np.asarray(c, np.float64)
    if labels is None:
        return _losses(float(total), float(count))
    out = _losses(float(np.sum(total)), float(np.sum(count)))
    out["by_label"] = [_losses(float(t), float(c)) for t, c in np.broadcast_to(np.stack([total, count], -1),
                                                                                (num_labels, 2))]
    return out


# --- a loaded run on a text -------------------------------------------------------------------

def evaluate_text(run: Run, text: str, eval_fn=None) -> dict:
    """Loss of ``run``'s model on ``text``, split into documents as the run was trained
    (``Run.evaluate``; ``eval_fn``: the run's ``make_eval_fn``, built here when None).

    Returns:
        ``{"nats": ..., "bits": ..., "chars": scored characters, "perplexity": ...}``.
    """
    check_argument("Run.evaluate", "text", text, (str,))
    if run.labels is not None:
        raise CharrnnError("this run was trained on labelled text: evaluate labelled text "
                           "(Run.evaluate_labelled; charrnn eval reads it in the run's --labels format)")
    docs = data_mod.split_documents(text, run.config.data.docs)
    if not docs:
        raise CharrnnError("the text to evaluate is empty")
    _check_known(run.vocab, "".join(docs))
    stream = data_mod.encode_documents(docs, run.vocab)
    cfg = run.config.train
    out = evaluate_stream(run.graphdef, run.params, run.model.initial_carry, stream,
                          num_streams=cfg.batch_size, seq_len=cfg.seq_len, eval_fn=eval_fn)
    return _with_perplexity(out)


def evaluate_labelled(run: Run, path, eval_fn=None) -> dict:
    """Loss of a labelled run's model on the labelled text at ``path`` (``Run.evaluate_labelled``):
    as ``evaluate_text``, plus ``"labels"``: ``{label: {"nats", "bits", "chars", "perplexity"}}``
    for every label of the run that the text has."""
    if run.labels is None:
        raise CharrnnError("this run was trained without labels: evaluate plain text")
    data = run.config.data
    docs = labels_mod.read_labelled(str(path), data.labels, data.docs, data.encoding)
    ids = docs.ids_in(run.labels, str(path))
    _check_known(run.vocab, "".join(docs.texts))
    stream = data_mod.encode_corpus(docs.corpus(), "file", run.vocab).stream
    cfg = run.config.train
    out = evaluate_stream(run.graphdef, run.params, run.model.initial_carry, stream,
                          num_streams=cfg.batch_size, seq_len=cfg.seq_len, eval_fn=eval_fn,
                          labels=docs.stream(ids), num_labels=run.labels.size)
    by_label = [_with_perplexity(d) for d in out.pop("by_label")]
    out = _with_perplexity(out)
    out["labels"] = {name: d for name, d in zip(run.labels.names, by_label) if d["chars"]}
    return out


def _check_known(vocab: Vocab, text: str) -> None:
    missing = vocab.unknown(text)
    if missing:
        raise CharrnnError(f"the text has {len(missing)} character(s) not in the vocabulary: "
                           f"{describe_chars(missing)}")


def _with_perplexity(losses: dict) -> dict:
    losses["perplexity"] = math.exp(losses["nats"]) if losses["chars"] else float("nan")
    return losses

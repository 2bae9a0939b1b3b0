"""The network: stacked recurrent cells over one-hot characters, dropout between layers, a dense
output layer (a Flax NNX module).

What a cell computes is defined in ``charrnn.cells``; ``charrnn.backends`` runs it (choosing
the fastest implementation that serves the cell, dtype and platform). Training runs each layer
over the whole window; sampling runs every layer one step at a time.

A labelled model (``num_labels > 0``, vector-to-sequence) also reads its document's label at
every step: the label's learned vector is joined to the one-hot character, ``x = [onehot(c);
e_label]``, so the first layer's ``w_ih`` has ``label_dim`` extra rows and ``x @ w_ih =
w_ih[c] + e_label @ w_ih[V:]``. The second term is a row of the ``(num_labels, G)`` table
``label_embedding @ w_ih[V:]``, computed once per call and gathered per token (``label_table``).
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from charrnn import backends, cells
from charrnn.config import GATES, ModelConfig
from charrnn.errors import CharrnnError
from charrnn.vocab import START

Carry = tuple  # one entry per layer; each entry is a tuple of (B, H) arrays


def _uniform(key, shape, bound):
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


class Cell(nnx.Module):
    """One recurrent layer's parameters: ``w_ih`` (inputs x gates), ``w_hh`` (hidden x gates),
    ``b_ih``, and for the GRU ``b_hh``; gate blocks side by side in PyTorch's order.

    Initialised as PyTorch does, every weight and bias U(-1/sqrt(H), 1/sqrt(H)); where the
    recurrence has no separate ``b_hh`` (tanh RNN, LSTM) ``b_ih`` starts as the sum of two such
    draws, as PyTorch's ``b_ih + b_hh``. No forget-gate bias of 1 for the LSTM: it trained worse
    on tinyshakespeare (docs/performance.md).
    """

    def __init__(self, kind: str, in_features: int, hidden: int, *, rngs: nnx.Rngs):
        bound = hidden ** -0.5
        g = GATES[kind] * hidden
        self.w_ih = nnx.Param(_uniform(rngs.params(), (in_features, g), bound))
        self.w_hh = nnx.Param(_uniform(rngs.params(), (hidden, g), bound))
        b = _uniform(rngs.params(), (g,), bound)
        if kind != "gru":
            b = b + _uniform(rngs.params(), (g,), bound)
        self.b_ih = nnx.Param(b)
        if kind == "gru":
            self.b_hh = nnx.Param(_uniform(rngs.params(), (g,), bound))

    def params(self) -> dict:
        """The layer's parameters as plain arrays, by name."""
        return {k: getattr(self, k)[...] for k in ("w_ih", "w_hh", "b_ih", "b_hh") if hasattr(self, k)}


def _dropout(x, rate: float, key, rows=None):
    """Inverted dropout of ``x_TxBxH``.

    ``rows`` is ``(first, total)`` when ``x`` holds rows ``first ..`` of a batch of ``total``
    (one device's part of a data-parallel batch). Each row's mask comes from its own key (``key``
    folded with the row's index in the whole batch), so a device draws only its own rows and every
    row is dropped as on a single device; 16 random bits per element against ``rate`` in 65536ths
    (threefry, XLA:CPU's bottleneck here, hashes half the words of a float draw).
    """
    if key is None or rate == 0.0:
        return x
    first = 0 if rows is None else rows[0]
    row_keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(first + jnp.arange(x.shape[1]))
    bits_BxTxH = jax.vmap(lambda k: jax.random.bits(k, (x.shape[0],) + x.shape[2:], jnp.uint16))(row_keys)
    keep = jnp.swapaxes(bits_BxTxH, 0, 1) >= min(round(rate * 65536), 65535)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


class CharRNN(nnx.Module):
    """Stacked recurrent cells over one-hot characters with a dense layer to vocabulary logits.

    Args:
        config: the model's shape.
        vocab_size: number of token ids (characters plus start and end).
        rngs: parameter initialisation randomness.
        num_labels: labels of a labelled run (0: unlabelled, and no label parameters at all).
    """

    def __init__(self, config: ModelConfig, vocab_size: int, *, rngs: nnx.Rngs, num_labels: int = 0):
        H = config.hidden
        self.config = config
        self.vocab_size = vocab_size
        self.num_labels = num_labels
        first_in = vocab_size + (config.label_dim if num_labels else 0)
        self.cells = nnx.List([Cell(config.cell, first_in if i == 0 else H, H, rngs=rngs)
                               for i in range(config.layers)])
        bound = H ** -0.5
        self.w_out = nnx.Param(_uniform(rngs.params(), (H, vocab_size), bound))
        self.b_out = nnx.Param(_uniform(rngs.params(), (vocab_size,), bound))
        if num_labels:  # drawn last: an unlabelled model's draws stay exactly as they were
            # N(0, 1) as torch.nn.Embedding: through w_ih's U(±1/sqrt(H)) rows a label moves each
            # gate by about as much as a character does.
            self.label_embedding = nnx.Param(
                jax.random.normal(rngs.params(), (num_labels, config.label_dim), jnp.float32))

    def initial_carry(self, batch: int) -> Carry:
        """Zero state for ``batch`` streams: the state every document starts from."""
        return tuple(cells.initial_carry(self.config.cell, batch, self.config.hidden) for _ in self.cells)

    def logits(self, h, dtype=jnp.float32):
        """The output layer: vocabulary logits (float32) from the top layer's ``h``."""
        return backends.dense(h, self.w_out[...], self.b_out[...], dtype)

    def label_table(self):
        """``(num_labels, G)``: each label's vector times the first layer's label rows of
        ``w_ih``, the label's whole contribution to the first layer's gates (float32)."""
        return jnp.dot(self.label_embedding[...], self.cells[0].w_ih[...][self.vocab_size:],
                       precision=jax.lax.Precision.HIGHEST)

    def label_term(self, label_weights_BxL):
        """``(B, G)``: the first layer's label input for rows that each mix the label vectors
        with weights summing to 1 (one-hot for one label): ``(w @ label_embedding) @ w_ih[V:]``,
        computed as ``w @ label_table()`` (the same product; a one-hot row gives exactly the
        table's row that training gathers). Constant over a sample's steps: pass it to
        ``step_with``."""
        self._check_labels(label_weights_BxL)
        return jnp.dot(jnp.asarray(label_weights_BxL, jnp.float32), self.label_table(),
                       precision=jax.lax.Precision.HIGHEST)

    def _check_labels(self, labels):
        if bool(self.num_labels) != (labels is not None):
            raise CharrnnError("a labelled model reads a label for every row" if self.num_labels
                               else "this model has no labels: it was not trained on labelled text")

    def __call__(self, carry: Carry, tokens_BxT, labels_BxT=None, *, dropout_key: Optional[Any] = None,
                 dtype=jnp.float32, dropout_rows=None) -> tuple[Carry, Any]:
        """Run over a window of tokens: ``(carry after the window, logits_BxTxV)`` (float32).

        The state is reset to zero wherever a start token is read, so documents never see each
        other. ``labels_BxT``: a labelled model's label id for every token (None otherwise).
        ``dropout_rows``: ``(first_row, total_rows)`` when ``tokens_BxT`` is one device's
        rows of a larger batch, so that dropout matches the whole batch's (see ``_dropout``).
        """
        self._check_labels(labels_BxT)
        tokens_TxB = tokens_BxT.T
        keep_TxBx1 = (tokens_TxB != START)[..., None].astype(jnp.float32)
        keys = jax.random.split(dropout_key, len(self.cells)) if dropout_key is not None else [None] * len(self.cells)
        # clip: a padded position (unscored) may hold any id; a fill would put NaN into its sums
        extra_TxBxG = None if labels_BxT is None else jnp.take(self.label_table(), labels_BxT.T.astype(jnp.int32),
                                                               axis=0, mode="clip")
        x, new_carry = tokens_TxB, []
        for i, (cell, c0, key) in enumerate(zip(self.cells, carry, keys)):
            c, h_TxBxH = backends.layer(self.config.cell, cell.params(), c0, x, keep_TxBx1, i == 0, dtype,
                                        extra_TxBxG if i == 0 else None)
            new_carry.append(c)
            x = _dropout(h_TxBxH, self.config.dropout, key, dropout_rows)
        return tuple(new_carry), jnp.swapaxes(self.logits(x, dtype), 0, 1)

    def step(self, carry: Carry, token_B, dtype=jnp.float32, label_weights_BxL=None) -> tuple[Carry, Any]:
        """Advance every layer by one token: ``(new_carry, logits_BxV)``. Unlike ``__call__`` it
        does not reset on a start token: the sampler starts from a fresh carry instead.
        ``label_weights_BxL``: a labelled model's label mix per row (see ``label_term``)."""
        term = None if label_weights_BxL is None else self.label_term(label_weights_BxL)
        return self.step_with(self.step_weights(dtype), carry, token_B, dtype, term)

    def step_weights(self, dtype=jnp.float32, threads: int = 1):
        """The weights ``step_with`` reads, prepared once outside a loop of steps (a step may split
        its columns over ``threads`` threads; the values do not depend on it)."""
        return backends.prepare_step(self.config.cell, [c.params() for c in self.cells], self.w_out[...],
                                     self.b_out[...], dtype, threads)

    def step_with(self, weights, carry: Carry, token_B, dtype=jnp.float32, label_term_BxG=None
                  ) -> tuple[Carry, Any]:
        """``step`` with ``step_weights``'s output and, for a labelled model, ``label_term``'s
        (both prepared once outside a loop of steps); reads no parameter of the module itself."""
        self._check_labels(label_term_BxG)
        return backends.step(self.config.cell, weights, carry, token_B, dtype, label_term_BxG)


def build_model(config: ModelConfig, vocab_size: int, seed, num_labels: int = 0) -> CharRNN:
    """A freshly initialised model; the same ``seed`` (an int or a PRNG key) gives the same
    parameters. ``num_labels`` > 0: a labelled model (see the module docstring)."""
    return CharRNN(config, vocab_size, rngs=nnx.Rngs(params=seed), num_labels=num_labels)


def abstract_model(config: ModelConfig, vocab_size: int, num_labels: int = 0) -> CharRNN:
    """The model's structure with shape-only parameters (no memory, no computation)."""
    return nnx.eval_shape(lambda: build_model(config, vocab_size, 0, num_labels))


def split_model(model: CharRNN):
    """``(graphdef, params)``: the static structure and a pure dict of parameter arrays."""
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state)


def count_params(params) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))

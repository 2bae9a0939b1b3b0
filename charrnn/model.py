"""The network: stacked recurrent cells over one-hot characters, dropout between layers, a dense
output layer (a Flax NNX module).

What a cell computes is defined in ``charrnn.cells``; ``charrnn.backends`` runs it (choosing
the fastest implementation that serves the cell, dtype and platform). Training runs each layer
over the whole window; sampling runs every layer one step at a time.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from charrnn import backends, cells
from charrnn.config import GATES, ModelConfig
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
    """

    def __init__(self, config: ModelConfig, vocab_size: int, *, rngs: nnx.Rngs):
        H = config.hidden
        self.config = config
        self.vocab_size = vocab_size
        self.cells = nnx.List([Cell(config.cell, vocab_size if i == 0 else H, H, rngs=rngs)
                               for i in range(config.layers)])
        bound = H ** -0.5
        self.w_out = nnx.Param(_uniform(rngs.params(), (H, vocab_size), bound))
        self.b_out = nnx.Param(_uniform(rngs.params(), (vocab_size,), bound))

    def initial_carry(self, batch: int) -> Carry:
        """Zero state for ``batch`` streams: the state every document starts from."""
        return tuple(cells.initial_carry(self.config.cell, batch, self.config.hidden) for _ in self.cells)

    def logits(self, h, dtype=jnp.float32):
        """The output layer: vocabulary logits (float32) from the top layer's ``h``."""
        return backends.dense(h, self.w_out[...], self.b_out[...], dtype)

    def __call__(self, carry: Carry, tokens_BxT, *, dropout_key: Optional[Any] = None,
                 dtype=jnp.float32, dropout_rows=None) -> tuple[Carry, Any]:
        """Run over a window of tokens: ``(carry after the window, logits_BxTxV)`` (float32).

        The state is reset to zero wherever a start token is read, so documents never see each
        other. ``dropout_rows``: ``(first_row, total_rows)`` when ``tokens_BxT`` is one device's
        rows of a larger batch, so that dropout matches the whole batch's (see ``_dropout``).
        """
        tokens_TxB = tokens_BxT.T
        keep_TxBx1 = (tokens_TxB != START)[..., None].astype(jnp.float32)
        keys = jax.random.split(dropout_key, len(self.cells)) if dropout_key is not None else [None] * len(self.cells)
        x, new_carry = tokens_TxB, []
        for i, (cell, c0, key) in enumerate(zip(self.cells, carry, keys)):
            c, h_TxBxH = backends.layer(self.config.cell, cell.params(), c0, x, keep_TxBx1, i == 0, dtype)
            new_carry.append(c)
            x = _dropout(h_TxBxH, self.config.dropout, key, dropout_rows)
        return tuple(new_carry), jnp.swapaxes(self.logits(x, dtype), 0, 1)

    def step(self, carry: Carry, token_B, dtype=jnp.float32) -> tuple[Carry, Any]:
        """Advance every layer by one token: ``(new_carry, logits_BxV)``. Unlike ``__call__`` it
        does not reset on a start token: the sampler starts from a fresh carry instead."""
        return self.step_with(self.step_weights(dtype), carry, token_B, dtype)

    def step_weights(self, dtype=jnp.float32, threads: int = 1):
        """The weights ``step_with`` reads, prepared once outside a loop of steps (a step may split
        its columns over ``threads`` threads; the values do not depend on it)."""
        return backends.prepare_step(self.config.cell, [c.params() for c in self.cells], self.w_out[...],
                                     self.b_out[...], dtype, threads)

    def step_with(self, weights, carry: Carry, token_B, dtype=jnp.float32) -> tuple[Carry, Any]:
        """``step`` with ``step_weights``'s output; reads no parameter of the module itself."""
        return backends.step(self.config.cell, weights, carry, token_B, dtype)


def build_model(config: ModelConfig, vocab_size: int, seed) -> CharRNN:
    """A freshly initialised model; the same ``seed`` (an int or a PRNG key) gives the same parameters."""
    return CharRNN(config, vocab_size, rngs=nnx.Rngs(params=seed))


def abstract_model(config: ModelConfig, vocab_size: int) -> CharRNN:
    """The model's structure with shape-only parameters (no memory, no computation)."""
    return nnx.eval_shape(lambda: build_model(config, vocab_size, 0))


def split_model(model: CharRNN):
    """``(graphdef, params)``: the static structure and a pure dict of parameter arrays."""
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state)


def count_params(params) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))

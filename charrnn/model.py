"""The network: stacked tanh-RNN / LSTM / GRU cells over one-hot characters, as a Flax NNX module.

Every cell splits its work in two: ``project`` computes the input contribution of the gates for
all time steps at once (for the first layer a gather of weight rows, because the input is
one-hot; above it one large matmul), and ``step`` advances the recurrence by one time step.
Training scans ``step`` over time layer by layer; sampling calls the same ``step`` once per
character, so the two cannot drift apart.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from charrnn.config import ModelConfig
from charrnn.vocab import START

Carry = tuple  # one entry per layer; each entry is a tuple of (B, H) arrays


def _uniform(key, shape, bound):
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def _matmul(x, w, dtype):
    """``x @ w`` with operands in ``dtype`` (bfloat16 uses the bf16 units) and a float32 result."""
    return jnp.dot(x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


class Cell(nnx.Module):
    """Shared parameters and input projection of one recurrent layer with ``gates`` gate blocks."""

    gates = 1
    state_arity = 1

    def __init__(self, in_features: int, hidden: int, *, one_hot: bool, rngs: nnx.Rngs):
        bound = hidden ** -0.5  # PyTorch's default U(-1/sqrt(H), 1/sqrt(H))
        g = self.gates * hidden
        self.hidden = hidden
        self.one_hot = one_hot
        self.w_ih = nnx.Param(_uniform(rngs.params(), (in_features, g), bound))
        self.w_hh = nnx.Param(_uniform(rngs.params(), (hidden, g), bound))
        self.b_ih = nnx.Param(self._init_bias(_uniform(rngs.params(), (g,), bound)))

    def _init_bias(self, b):
        return b

    def project(self, x, dtype=jnp.float32):
        """Input part of the gates: ``x`` is token ids (first layer) or the layer below's output."""
        if self.one_hot:
            # one_hot(x) @ w_ih == w_ih[x]: a row gather instead of a V-wide matmul.
            return jnp.take(self.w_ih[...], x, axis=0) + self.b_ih[...]
        return _matmul(x, self.w_ih[...], dtype) + self.b_ih[...]

    def initial_carry(self, batch: int) -> tuple:
        return tuple(jnp.zeros((batch, self.hidden), jnp.float32) for _ in range(self.state_arity))

    def output(self, carry: tuple):
        """The hidden output ``h`` held in a carry."""
        return carry[-1]


class RNNCell(Cell):
    """Elman cell: ``h' = tanh(x W_ih + b + h W_hh)``."""

    def step(self, carry, xw_BxG, dtype=jnp.float32):
        (h,) = carry
        h = jnp.tanh(xw_BxG + _matmul(h, self.w_hh[...], dtype))
        return (h,), h


class LSTMCell(Cell):
    """LSTM with gates ordered input, forget, cell, output (as PyTorch); carry is ``(c, h)``."""

    gates = 4
    state_arity = 2

    def _init_bias(self, b):
        # Forget-gate bias 1 keeps early gradients flowing through c (Jozefowicz et al. 2015).
        h = b.shape[0] // 4
        return b.at[h:2 * h].add(1.0)

    def step(self, carry, xw_BxG, dtype=jnp.float32):
        c, h = carry
        z = xw_BxG + _matmul(h, self.w_hh[...], dtype)
        i, f, g, o = jnp.split(z, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (c, h), h


class GRUCell(Cell):
    """GRU as PyTorch defines it: ``n = tanh(x W_in + b_in + r * (h W_hn + b_hn))``."""

    gates = 3

    def __init__(self, in_features: int, hidden: int, *, one_hot: bool, rngs: nnx.Rngs):
        super().__init__(in_features, hidden, one_hot=one_hot, rngs=rngs)
        self.b_hh = nnx.Param(_uniform(rngs.params(), (3 * hidden,), hidden ** -0.5))

    def step(self, carry, xw_BxG, dtype=jnp.float32):
        (h,) = carry
        hw = _matmul(h, self.w_hh[...], dtype) + self.b_hh[...]
        xr, xz, xn = jnp.split(xw_BxG, 3, axis=-1)
        hr, hz, hn = jnp.split(hw, 3, axis=-1)
        r = jax.nn.sigmoid(xr + hr)
        z = jax.nn.sigmoid(xz + hz)
        n = jnp.tanh(xn + r * hn)
        h = (1.0 - z) * n + z * h
        return (h,), h


CELL_TYPES = {"rnn": RNNCell, "lstm": LSTMCell, "gru": GRUCell}


def _dropout(x, rate: float, key):
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


class CharRNN(nnx.Module):
    """Stacked recurrent cells over one-hot characters with a dense layer to vocabulary logits.

    Args:
        config: the model's shape.
        vocab_size: number of token ids (characters plus start and end).
        rngs: parameter initialisation randomness.
    """

    def __init__(self, config: ModelConfig, vocab_size: int, *, rngs: nnx.Rngs):
        cell = CELL_TYPES[config.cell]
        H = config.hidden
        self.config = config
        self.vocab_size = vocab_size
        self.cells = nnx.List([
            cell(vocab_size if i == 0 else H, H, one_hot=(i == 0), rngs=rngs) for i in range(config.layers)
        ])
        bound = H ** -0.5
        self.w_out = nnx.Param(_uniform(rngs.params(), (H, vocab_size), bound))
        self.b_out = nnx.Param(_uniform(rngs.params(), (vocab_size,), bound))

    def initial_carry(self, batch: int) -> Carry:
        """Zero state for ``batch`` streams: the state every document starts from."""
        return tuple(c.initial_carry(batch) for c in self.cells)

    def logits(self, h, dtype=jnp.float32):
        return _matmul(h, self.w_out[...], dtype) + self.b_out[...]

    def __call__(self, carry: Carry, tokens_BxT, *, dropout_key: Optional[Any] = None,
                 dtype=jnp.float32, unroll: int = 1) -> tuple[Carry, Any]:
        """Run over a window of tokens.

        The state is reset to zero wherever a start token is read, so documents never see
        each other. Returns the carry after the window and ``logits_BxTxV`` (float32).
        """
        tokens_TxB = tokens_BxT.T
        keep_TxBx1 = (tokens_TxB != START)[..., None].astype(jnp.float32)
        keys = (jax.random.split(dropout_key, len(self.cells)) if dropout_key is not None
                else [None] * len(self.cells))
        x = tokens_TxB
        new_carry = []
        for cell, c0, key in zip(self.cells, carry, keys):
            xw_TxBxG = cell.project(x, dtype)

            def body(c, inp, cell=cell):
                xw, keep = inp
                c = tuple(a * keep for a in c)
                return cell.step(c, xw, dtype)

            c, h_TxBxH = jax.lax.scan(body, c0, (xw_TxBxG, keep_TxBx1), unroll=unroll)
            new_carry.append(c)
            x = _dropout(h_TxBxH, self.config.dropout, key)
        logits_TxBxV = self.logits(x, dtype)
        return tuple(new_carry), jnp.swapaxes(logits_TxBxV, 0, 1)

    def step(self, carry: Carry, token_B, dtype=jnp.float32) -> tuple[Carry, Any]:
        """Advance every layer by one token; returns the new carry and ``logits_BxV``.

        Unlike ``__call__`` it does not reset on a start token: the sampler starts from a
        fresh carry instead.
        """
        x = token_B
        new_carry = []
        for cell, c in zip(self.cells, carry):
            c, x = cell.step(c, cell.project(x, dtype), dtype)
            new_carry.append(c)
        return tuple(new_carry), self.logits(x, dtype)


def build_model(config: ModelConfig, vocab_size: int, seed: int) -> CharRNN:
    """A freshly initialised model; the same ``seed`` gives the same parameters."""
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

"""What each recurrent cell computes: the lecture notes' equations, one step and its scan.

This is the definition. Every fast implementation in ``charrnn.backends`` computes the same
function and is tested against this module (values and gradients); gradients here come from
autodiff. ``xw`` is the layer's input already multiplied by ``w_ih`` (for the first layer, whose
input is one-hot, that product is a row gather); gate blocks sit side by side along the last
axis in PyTorch's order, and ``b_ih`` of the tanh RNN and the LSTM holds both of their biases.
A step reads ``(B, ...)`` arrays; ``b[None]`` is a bias broadcast over those rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from charrnn.config import GATES

sigmoid, tanh = jax.nn.sigmoid, jnp.tanh


def rnn(p, carry, xw):
    """Elman: ``h' = tanh(x W_ih + h W_hh + b)``."""
    (h,) = carry
    return (tanh(xw + h @ p["w_hh"] + p["b_ih"][None]),)


def lstm(p, carry, xw):
    """LSTM, gates i, f, g, o: ``c' = σ(f) c + σ(i) tanh(g)``, ``h' = σ(o) tanh(c')``."""
    c, h = carry
    i, f, g, o = jnp.split(xw + h @ p["w_hh"] + p["b_ih"][None], 4, axis=-1)
    c = sigmoid(f) * c + sigmoid(i) * tanh(g)
    return c, sigmoid(o) * tanh(c)


def gru(p, carry, xw):
    """GRU as PyTorch: ``n = tanh(x W_in + b_in + r (h W_hn + b_hn))``, ``h' = (1 - z) n + z h``."""
    (h,) = carry
    xr, xz, xn = jnp.split(xw + p["b_ih"][None], 3, axis=-1)
    hr, hz, hn = jnp.split(h @ p["w_hh"] + p["b_hh"][None], 3, axis=-1)
    r, z = sigmoid(xr + hr), sigmoid(xz + hz)
    n = tanh(xn + r * hn)
    return ((1.0 - z) * n + z * h,)


STEP = {"rnn": rnn, "lstm": lstm, "gru": gru}
assert set(STEP) == set(GATES)


def state_size(kind: str) -> int:
    """Arrays in a layer's carry: ``(c, h)`` for the LSTM, ``(h,)`` otherwise."""
    return 2 if kind == "lstm" else 1


def initial_carry(kind: str, batch: int, hidden: int) -> tuple:
    """The zero state every document starts from."""
    return tuple(jnp.zeros((batch, hidden), jnp.float32) for _ in range(state_size(kind)))


def scan(kind: str, p, carry, xw_TxBxG, keep_TxBx1):
    """The cell over a window: the state is zeroed before each step where ``keep`` is 0 (the step
    reads a start token). Returns ``(final_carry, h_TxBxH)``."""
    step = STEP[kind]

    def body(c, inputs):
        xw, keep = inputs
        c = step(p, tuple(jnp.where(keep > 0, a, 0.0) for a in c), xw)
        return c, c[-1]

    return jax.lax.scan(body, tuple(carry), (xw_TxBxG, keep_TxBx1))


def layer(kind: str, p, carry, x, keep_TxBx1, one_hot: bool):
    """One layer over a window from its input: token ids ``(T, B)`` (``one_hot``) or the layer
    below's ``(T, B, I)`` output."""
    xw = jnp.take(p["w_ih"], x, axis=0) if one_hot else x @ p["w_ih"]
    return scan(kind, p, carry, xw, keep_TxBx1)

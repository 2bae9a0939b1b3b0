"""XLA's own operations: a layer's window as a scan with a hand-written backward, and one
sampling step. Serves every cell, dtype and platform; the fallback of every other backend.

On CPU a scan's cost is the fixed cost of each operation in each iteration, not arithmetic, and
autodiff of a scan body does more per iteration than needed (it accumulates the ``w_hh``
gradient inside the loop). The backward here keeps only what depends on the previous step in the
loop (gate derivatives and one ``dz @ w_hh.T``) and forms the ``w_hh`` / ``b_hh`` gradients after
it as one matmul / sum over all steps. Gate blocks are kept in separate arrays (``gate_blocks``).
Measurements: docs/performance.md.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from charrnn.backends import bf16_matmul
from charrnn.backends.bf16_matmul import matmul
from charrnn.config import GATES


def bias(b, x):
    """``b`` broadcast explicitly against ``x``'s leading axes (no implicit rank promotion)."""
    return jnp.expand_dims(b, tuple(range(x.ndim - 1)))


def gate_blocks(x, gates: int) -> tuple:
    """``x`` split along its last axis into ``gates`` arrays: inside a scan body XLA:CPU emits
    scalar code for a fusion that reads several minor-axis slices of one array."""
    return tuple(jnp.split(x, gates, axis=-1)) if gates > 1 else (x,)


def project_blocks(one_hot: bool, ws: tuple, bs: tuple, x, dtype, extra=None) -> tuple:
    """The input part of the gates per block, from ``w_ih``'s and ``b_ih``'s blocks (computed per
    block, not split afterwards: every array then stays contiguous both ways), plus ``extra``'s
    blocks where given (a further part of the input projection, ``(..., G)``)."""
    xws = tuple(jnp.take(w, x, axis=0) for w in ws) if one_hot else tuple(matmul(x, w, dtype) for w in ws)
    if extra is not None:
        xws = tuple(xw + e for xw, e in zip(xws, gate_blocks(extra, len(ws))))
    return tuple(xw + bias(b, xw) for xw, b in zip(xws, bs))


@dataclass(frozen=True)
class FusedGates:
    """A weight's gate blocks side by side, multiplied in one matmul and split after (a sampling
    step: one wide matmul costs a little less than ``gates`` narrow ones)."""

    w: Any
    gates: int


def _recurrent(h, w, dtype):
    out = ()
    for wk in w:
        out += gate_blocks(matmul(h, wk.w, dtype), wk.gates) if isinstance(wk, FusedGates) else (matmul(h, wk, dtype),)
    return out


def _back_recurrent(d_hw, wt, dtype):
    """``sum_k d_k @ w_k.T`` with ``wt`` already transposed."""
    return functools.reduce(jnp.add, (matmul(d, wk, dtype) for d, wk in zip(d_hw, wt)))


# --- each cell's step and its vector-Jacobian product, on gate blocks -----------------------
# forward(w, carry, xw, dtype) -> (new_carry, saved); backward(wt, saved, prev, new, d_new, dtype)
# -> (d_xw, d_hw, d_prev): cotangents of the input part of the gates, of the recurrent
# pre-activations (h @ w_hh + b_hh) per gate, and of the carry the step read.

def _rnn_forward(w, carry, xw, dtype):
    (h,) = carry
    (hw,) = _recurrent(h, w, dtype)
    return (jnp.tanh(xw[0] + hw),), ()


def _rnn_backward(wt, saved, prev, new, d_new, dtype):
    (h,), (dh,) = new, d_new
    dz = (dh * (1.0 - h * h),)
    return dz, dz, (_back_recurrent(dz, wt, dtype),)


def _lstm_forward(w, carry, xw, dtype):
    c, h = carry
    zi, zf, zg, zo = (x + r for x, r in zip(xw, _recurrent(h, w, dtype)))
    i, f, g, o = jax.nn.sigmoid(zi), jax.nn.sigmoid(zf), jnp.tanh(zg), jax.nn.sigmoid(zo)
    c = f * c + i * g
    return (c, o * jnp.tanh(c)), (i, f, g, o)


def _lstm_backward(wt, saved, prev, new, d_new, dtype):
    i, f, g, o = saved
    (c_prev, _), (c, _), (dc, dh) = prev, new, d_new
    tc = jnp.tanh(c)
    dc = dc + dh * o * (1.0 - tc * tc)
    dz = (dc * g * i * (1.0 - i), dc * c_prev * f * (1.0 - f), dc * i * (1.0 - g * g), dh * tc * o * (1.0 - o))
    return dz, dz, (dc * f, _back_recurrent(dz, wt, dtype))


def _gru_forward(w, carry, xw, dtype):
    (h,) = carry
    hr, hz, hn = (r + bias(b, h) for r, b in zip(_recurrent(h, w[:-3], dtype), w[-3:]))
    xr, xz, xn = xw
    r, z = jax.nn.sigmoid(xr + hr), jax.nn.sigmoid(xz + hz)
    n = jnp.tanh(xn + r * hn)
    return ((1.0 - z) * n + z * h,), (r, z, n, hn)


def _gru_backward(wt, saved, prev, new, d_new, dtype):
    r, z, n, hn = saved
    (h_prev,), (dh,) = prev, d_new
    dn = dh * (1.0 - z) * (1.0 - n * n)
    dr = dn * hn * r * (1.0 - r)
    dz = dh * (h_prev - n) * z * (1.0 - z)
    d_hw = (dr, dz, dn * r)
    return (dr, dz, dn), d_hw, (dh * z + _back_recurrent(d_hw, wt[:3], dtype),)


FORWARD = {"rnn": _rnn_forward, "lstm": _lstm_forward, "gru": _gru_forward}
BACKWARD = {"rnn": _rnn_backward, "lstm": _lstm_backward, "gru": _gru_backward}


def _recurrent_weights(kind: str, p) -> tuple:
    """What the recurrence reads: ``w_hh``'s gate blocks (and the GRU's ``b_hh`` blocks)."""
    w = gate_blocks(p["w_hh"], GATES[kind])
    return w + gate_blocks(p["b_hh"], 3) if kind == "gru" else w


def _in_loop_weights(w, dtype, transpose: bool = False) -> tuple:
    """Recurrent weights prepared once before the loop (cast, transposed for the backward, or
    packed for the bf16 kernel): XLA:CPU does not reliably hoist these loop invariants."""
    if dtype == jnp.bfloat16 and bf16_matmul.enabled():
        return tuple(wk if wk.ndim != 2 else bf16_matmul.pack(wk, transpose) for wk in w)
    w = tuple(wk if wk.ndim != 2 else wk.astype(dtype).T if transpose else wk.astype(dtype) for wk in w)
    # The barrier stops XLA folding the transpose back into the dot (~10% slower in the loop).
    return jax.lax.optimization_barrier(w) if transpose else w


def layer(kind: str, p, carry, x, keep_TxBx1, one_hot: bool, dtype=jnp.float32, extra_TxBxG=None):
    """One layer over a window (see ``charrnn.cells.layer``): ``(final_carry, h_TxBxH)``;
    ``extra_TxBxG``: a further part of the input projection (``charrnn.backends.layer``)."""
    gates = GATES[kind]
    xw = project_blocks(one_hot, gate_blocks(p["w_ih"], gates), gate_blocks(p["b_ih"], gates), x, dtype,
                        extra_TxBxG)
    return _scan_layer(kind, dtype, _recurrent_weights(kind, p), tuple(carry), xw, keep_TxBx1)


def _shift_in(first_BxH, seq_TxBxH):
    """``[first, seq[0], ..., seq[T-2]]``: what each step read, from what each step wrote."""
    return jnp.concatenate([first_BxH[None], seq_TxBxH[:-1]], axis=0)


def _forward_scan(kind, dtype, w, carry0, xw_TxBxH, keep_TxBx1, emit):
    """The layer's steps over time; each step outputs ``emit(carry, saved)`` (what the caller
    keeps: the primal keeps the hidden state, the VJP's forward pass what backward reads)."""
    w = _in_loop_weights(w, dtype)
    forward = FORWARD[kind]

    def body(c, inp):
        xw, keep = inp
        c, saved = forward(w, tuple(a * keep for a in c), xw, dtype)
        return c, emit(c, saved)

    return jax.lax.scan(body, carry0, (xw_TxBxH, keep_TxBx1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _scan_layer(kind, dtype, w, carry0, xw_TxBxH, keep_TxBx1):
    return _forward_scan(kind, dtype, w, carry0, xw_TxBxH, keep_TxBx1, lambda c, saved: c[-1])


def _scan_layer_fwd(kind, dtype, w, carry0, xw_TxBxH, keep_TxBx1):
    final, (carries_TxBxH, saved_TxBxH) = _forward_scan(kind, dtype, w, carry0, xw_TxBxH, keep_TxBx1,
                                                        lambda c, saved: (c, saved))
    return (final, carries_TxBxH[-1]), (w, carry0, carries_TxBxH, saved_TxBxH, keep_TxBx1)


def _scan_layer_bwd(kind, dtype, res, cotangents):
    w, carry0, carries_TxBxH, saved_TxBxH, keep_TxBx1 = res
    d_final, dh_TxBxH = cotangents
    prevs_TxBxH = tuple(_shift_in(a0, a) * keep_TxBx1 for a0, a in zip(carry0, carries_TxBxH))
    wt = _in_loop_weights(w, dtype, transpose=True)
    backward = BACKWARD[kind]
    # d_hw blocks that are the very same arrays as d_xw blocks (all for the LSTM and the RNN, two
    # of three for the GRU) are stacked once, not twice: each stacked output costs a write a step.
    shared = []

    def body(d_carry, inp):
        saved, prev, new, dh_out, keep = inp
        d_new = d_carry[:-1] + (d_carry[-1] + dh_out,)
        d_xw, d_hw, d_prev = backward(wt, saved, prev, new, d_new, dtype)
        same = [next((j for j, x in enumerate(d_xw) if x is h), None) for h in d_hw]
        shared[:] = same
        return tuple(d * keep for d in d_prev), (d_xw, tuple(h for h, j in zip(d_hw, same) if j is None))

    d_carry0, (d_xw_TxBxH, d_hw_own) = jax.lax.scan(
        body, tuple(d_final), (saved_TxBxH, prevs_TxBxH, carries_TxBxH, dh_TxBxH, keep_TxBx1), reverse=True)
    own = iter(d_hw_own)
    d_hw_TxBxH = tuple(next(own) if j is None else d_xw_TxBxH[j] for j in shared)
    # The recurrent weights' gradients for all steps at once: one (H, T*B) @ (T*B, H) per block.
    h_prev = prevs_TxBxH[-1].reshape(-1, prevs_TxBxH[-1].shape[-1])
    d_hw = tuple(d.reshape(h_prev.shape) for d in d_hw_TxBxH)
    d_w = tuple(matmul(h_prev.T, d, dtype) for d in d_hw)
    if len(w) > len(d_w):  # the GRU's w also holds b_hh's gate blocks
        d_w += tuple(jnp.sum(d, axis=0) for d in d_hw)
    return d_w, d_carry0, d_xw_TxBxH, jnp.zeros_like(keep_TxBx1)


_scan_layer.defvjp(_scan_layer_fwd, _scan_layer_bwd)


# --- sampling: one step at a time ---------------------------------------------------------

def prepare_step(kind: str, cells: list, w_out, b_out, dtype=jnp.float32) -> tuple:
    """The weights ``step`` reads, prepared once outside a loop of steps: ``w_ih``'s and
    ``b_ih``'s blocks split here (split inside the loop, every step copies each block out of its
    strided parent), ``w_hh`` whole (``FusedGates``)."""
    gates = GATES[kind]
    out = []
    for p in cells:
        recurrent = (FusedGates(p["w_hh"].astype(dtype), gates),)
        if kind == "gru":
            recurrent += gate_blocks(p["b_hh"], 3)
        out.append((gate_blocks(p["w_ih"], gates), gate_blocks(p["b_ih"], gates), recurrent))
    return tuple(out), (w_out, b_out)


def step(kind: str, weights, carry, token_B, dtype=jnp.float32, extra_BxG=None):
    """One step of every layer from ``token_B``: ``(new_carry, logits_BxV)``; ``extra_BxG``: a
    further part of the first layer's input projection (a label term), or None."""
    cells, (w_out, b_out) = weights
    x, new_carry = token_B, []
    for i, ((ws, bs, recurrent), c) in enumerate(zip(cells, carry)):
        xw = project_blocks(i == 0, ws, bs, x, dtype, extra_BxG if i == 0 else None)
        c, _ = FORWARD[kind](recurrent, c, xw, dtype)
        new_carry.append(c)
        x = c[-1]
    logits = matmul(x, w_out, dtype)
    return tuple(new_carry), logits + bias(b_out, logits)

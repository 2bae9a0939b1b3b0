"""The network: stacked tanh-RNN / LSTM / GRU cells over one-hot characters, as a Flax NNX module.

Every cell splits its work in two: ``project`` computes the input contribution of the gates for
all time steps at once (for the first layer a gather of weight rows, because the input is
one-hot; above it one large matmul), and ``forward`` advances the recurrence by one time step.
Training scans ``forward`` over time layer by layer (``Cell.scan``); sampling calls the same
``forward`` once per character (``Cell.step_with``), so the two cannot drift apart.

The scan over a window (``Cell.scan``) has a hand-written backward pass (``jax.custom_vjp``).
On CPU the cost of a scan is dominated by the fixed cost of each operation in each iteration,
not by arithmetic, and autodiff of a scan body does far more per-iteration work than needed
(it accumulates the ``w_hh`` gradient with a matmul and an add inside the loop, and carries
many small buffers). The hand-written backward keeps only what truly depends on the previous
time step inside the loop (gate derivatives and one ``dz @ w_hh.T``) and computes the
``w_hh`` / ``b_hh`` gradients afterwards as one large matmul / sum over all time steps. The
forward equations are shared with ``step_with``, so scan and step agree (to float rounding:
a sampling step multiplies by all of a layer's recurrent gate blocks at once, ``FusedGates``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from charrnn import amx, lstm_kernel, step_kernel
from charrnn.config import ModelConfig
from charrnn.vocab import START

Carry = tuple  # one entry per layer; each entry is a tuple of (B, H) arrays


def _uniform(key, shape, bound):
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def _matmul(x, w, dtype):
    """``x @ w`` with operands in ``dtype`` (bfloat16 uses the bf16 units) and a float32 result.

    In bfloat16 on a CPU with AMX, the product runs on charrnn's tile kernel (``charrnn.amx``);
    ``w`` may then already be packed for it (``_in_loop_weights``).
    """
    if isinstance(w, amx.Packed):
        return amx.packed_dot(x, w)
    if dtype == jnp.bfloat16 and amx.enabled():
        return amx.dot(x.astype(dtype), w.astype(dtype))
    # On 2-D views: the gradient of a dot over a (T, B, K) x is a dot contracting two axes, for
    # which XLA:CPU first copied the whole (T, B, N) cotangent into a transposed layout (~3.4
    # ms of a ~45 ms char-rnn-default step for layer 2's w_ih alone); flattened, the weight
    # gradient is a plain x^T @ dz on the arrays as they are.
    lead = x.shape[:-1]
    y = jnp.dot(x.reshape(-1, x.shape[-1]).astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)
    return y.reshape(*lead, w.shape[-1])


class Cell(nnx.Module):
    """Shared parameters and input projection of one recurrent layer with ``gates`` gate blocks.

    A subclass defines its recurrence twice over, as pure functions of the recurrent weights
    (``recurrent_weights``): ``forward`` (one time step, also returning what the backward pass
    needs) and ``backward`` (that step's vector-Jacobian product, without the weight gradient).
    ``step_with`` and ``scan`` are both built on ``forward``.
    """

    kind = "rnn"  # the name in CELL_TYPES (and step_kernel.KINDS)
    gates = 1
    state_arity = 1
    folds_b_hh = True  # False where the recurrence needs its own b_hh (the GRU)

    def __init__(self, in_features: int, hidden: int, *, one_hot: bool, rngs: nnx.Rngs):
        bound = hidden ** -0.5  # PyTorch's default U(-1/sqrt(H), 1/sqrt(H))
        g = self.gates * hidden
        self.hidden = hidden
        self.one_hot = one_hot
        self.w_ih = nnx.Param(_uniform(rngs.params(), (in_features, g), bound))
        self.w_hh = nnx.Param(_uniform(rngs.params(), (hidden, g), bound))
        # PyTorch's default initialisation: every weight and bias U(-1/sqrt(H), 1/sqrt(H)). Where
        # b_hh is folded into b_ih (tanh RNN, LSTM) the one vector starts as the sum of two such
        # draws, as PyTorch's b_ih + b_hh do. No forget-gate bias of 1 for the LSTM: on
        # tinyshakespeare (LSTM 2x256, batch 64x100, 450 steps, three seeds) a forget bias of 1
        # ended 0.04-0.11 nats/char behind none, and PyTorch's own initial weights 0.07-0.15
        # ahead of the forget-bias initialisation charrnn used before.
        b = _uniform(rngs.params(), (g,), bound)
        if self.folds_b_hh:
            b = b + _uniform(rngs.params(), (g,), bound)
        self.b_ih = nnx.Param(b)

    def project(self, x, dtype=jnp.float32):
        """Input part of the gates: ``x`` is token ids (first layer) or the layer below's output."""
        xw = self.project_without_bias(x, dtype)
        return xw + _bias(self.b_ih[...], xw)

    def project_without_bias(self, x, dtype=jnp.float32):
        """``x @ w_ih``, all gates side by side (``project`` less ``b_ih``)."""
        if self.one_hot:
            # one_hot(x) @ w_ih == w_ih[x]: a row gather instead of a V-wide matmul.
            return jnp.take(self.w_ih[...], x, axis=0)
        return _matmul(x, self.w_ih[...], dtype)

    def project_blocks(self, x, dtype=jnp.float32) -> tuple:
        """``project`` as one array per gate block: ``_gate_blocks(self.project(x, dtype))``.

        Computed per block (a gather from, or a matmul with, each gate's columns of ``w_ih``)
        rather than split afterwards: splitting a ``(T, B, G)`` array along its minor axis costs
        a strided copy per block, and the split's gradient a concatenation plus a transpose of
        the whole ``(T*B, G)`` cotangent for the ``w_ih`` gradient. Per block, every array stays
        contiguous in both directions (together ~10 ms of a 70 ms LSTM 2x128 step).
        """
        return _project_blocks(self.one_hot, _gate_blocks(self.w_ih[...], self.gates),
                               _gate_blocks(self.b_ih[...], self.gates), x, dtype)

    def initial_carry(self, batch: int) -> tuple:
        return tuple(jnp.zeros((batch, self.hidden), jnp.float32) for _ in range(self.state_arity))

    def output(self, carry: tuple):
        """The hidden output ``h`` held in a carry."""
        return carry[-1]

    def recurrent_weights(self) -> tuple:
        """The parameters the recurrence reads, one ``(H, H)`` block of ``w_hh`` per gate.

        ``forward`` and ``backward`` take these as ``w``. See ``_gate_blocks`` for why per gate.
        """
        return _gate_blocks(self.w_hh[...], self.gates)

    def step_weights(self, dtype=jnp.float32, threads: int = 1, native: bool = False) -> tuple:
        """What ``step_with`` reads, prepared once for many single steps (sampling).

        The gate blocks of ``w_ih`` and ``b_ih``, split here: split inside a loop instead,
        every step copies each block out of its strided parent (XLA:CPU does not hoist that
        out of the loop when the weights are loop inputs rather than constants; GRU 2x256
        sampled 2.6x slower at batch 1). ``w_hh`` stays whole (``FusedGates``): one matmul
        per step for all gates.

        With ``native`` (``CharRNN.step_weights`` decides) the step runs on charrnn's native
        kernel instead (``charrnn.step_kernel``), and this returns its ``StepWeights`` (packed
        once here; each step split over ``threads`` threads).
        """
        if native:
            g = self.gates * self.hidden
            w_ih = self.w_ih[...] if self.one_hot else step_kernel.pack(self.w_ih[...], self.gates)
            b_hh = self.b_hh[...] if not self.folds_b_hh else jnp.zeros((g,), jnp.float32)
            w_hh = step_kernel.pack(self.w_hh[...], self.gates, threads)
            return step_kernel.StepWeights(w_ih, self.b_ih[...], w_hh, b_hh, self.kind)
        return (_gate_blocks(self.w_ih[...], self.gates), _gate_blocks(self.b_ih[...], self.gates),
                self.step_recurrent_weights(dtype))

    def step_recurrent_weights(self, dtype=jnp.float32) -> tuple:
        """``recurrent_weights`` for single steps: ``w_hh`` as one ``FusedGates``."""
        return (FusedGates(self.w_hh[...].astype(dtype), self.gates),)

    def step_with(self, weights, carry, x, dtype=jnp.float32):
        """One time step from ``x`` (token ids, or the layer below's output) with ``step_weights``'s
        output: ``(new_carry, h)``, one step of what ``scan`` computes over a window."""
        if isinstance(weights, step_kernel.StepWeights):
            carry = step_kernel.cell_step(weights, tuple(carry), x)
            return carry, carry[-1]
        ws, bs, w = weights
        carry, _ = self.forward(w, carry, _project_blocks(self.one_hot, ws, bs, x, dtype), dtype)
        return carry, carry[-1]

    def scan(self, carry, xw_TxBxG, keep_TxBx1, dtype=jnp.float32, unroll: int = 1):
        """``forward`` over a window, zeroing the state before each step where ``keep`` is 0.

        ``xw_TxBxG`` is ``project_blocks``'s output (or the whole ``(T, B, G)`` projection).
        Returns ``(final_carry, h_TxBxH)``; differentiable through the hand-written backward.
        """
        return _scan_layer(type(self), dtype, unroll, self.recurrent_weights(), tuple(carry),
                           _as_blocks(xw_TxBxG, self.gates), keep_TxBx1)

    def layer(self, carry, x, keep_TxBx1, dtype=jnp.float32, unroll: int = 1):
        """The layer over a window from its input ``x`` (``(T, B)`` token ids, or the layer
        below's ``(T, B, H_in)`` output): ``scan`` of ``project_blocks``. Returns
        ``(final_carry, h_TxBxH)``."""
        return self.scan(carry, self.project_blocks(x, dtype), keep_TxBx1, dtype, unroll)

    # --- the recurrence as pure functions (subclasses define these) -------------------------

    @staticmethod
    def forward(w, carry, xw, dtype):
        """``(new_carry, saved)``: one step, and the per-step values ``backward`` needs.

        ``xw`` is the input part of the gates, one ``(B, H)`` array per gate; ``saved`` is a
        tuple of ``(B, H)`` arrays.
        """
        raise NotImplementedError

    @staticmethod
    def backward(wt, saved, prev, new, d_new, dtype):
        """The step's VJP.

        Args: ``wt`` the recurrent weights with every ``(H, H)`` block transposed (see
        ``_in_loop_weights``), ``prev`` the carry the step read (already reset), ``new`` the carry it
        produced, ``saved`` its extra values, ``d_new`` the cotangent of ``new``.
        Returns ``(d_xw, d_hw, d_prev)``: the cotangents of the input part of the gates and of
        the recurrent pre-activations ``prev_h @ w_hh`` (plus ``b_hh``), both per gate, and of
        ``prev``.
        """
        raise NotImplementedError


def _gate_blocks(x, gates: int) -> tuple:
    """``x`` split along its last axis into ``gates`` separate arrays.

    Inside a scan body XLA:CPU does not vectorise an elementwise fusion that reads several
    slices of one array along its minor axis (it emits scalar code, and the sigmoids and
    tanhs then cost ~10x more). Splitting the gate blocks before the loop and keeping them in
    separate arrays (with one small matmul per gate) avoids that: about 2.5x faster per step.
    """
    return tuple(jnp.split(x, gates, axis=-1)) if gates > 1 else (x,)


def _project_blocks(one_hot: bool, ws: tuple, bs: tuple, x, dtype) -> tuple:
    """The input part of the gates per gate block, from ``w_ih``'s and ``b_ih``'s blocks."""
    if one_hot:  # one_hot(x) @ w == w[x]: a row gather instead of a V-wide matmul
        xws = tuple(jnp.take(w, x, axis=0) for w in ws)
    else:
        xws = tuple(_matmul(x, w, dtype) for w in ws)
    return tuple(xw + _bias(b, xw) for xw, b in zip(xws, bs))


def _as_blocks(xw, gates: int) -> tuple:
    """Gate blocks from either a whole ``(..., G)`` array or an already split tuple."""
    return tuple(xw) if isinstance(xw, (tuple, list)) else _gate_blocks(xw, gates)


@dataclass(frozen=True)
class FusedGates:
    """Gate blocks of a weight kept side by side, ``(H, gates * H)``, for ``_recurrent`` to
    multiply by in one matmul and split after.

    Sampling's steps use it (``Cell.step_recurrent_weights``): a step is a chain of small
    matmuls, and one wide one costs a little less than ``gates`` narrow ones. Per step, one
    core, medians of four alternating runs: LSTM 2x128 batch 1 32.5 -> 30.6 us, batch 32 329
    -> 303 us; GRU 2x256 142 -> 140 us and 816 -> 802 us (within this host's noise). The
    training scans keep the blocks apart (see ``_gate_blocks``).
    """

    w: Any
    gates: int


def _recurrent(h, w, dtype):
    """The recurrent pre-activations, one ``h @ w_k`` per gate block (a ``FusedGates`` entry
    of ``w`` gives all its blocks from one matmul)."""
    out = ()
    for wk in w:
        if isinstance(wk, FusedGates):
            out += _gate_blocks(_matmul(h, wk.w, dtype), wk.gates)
        else:
            out += (_matmul(h, wk, dtype),)
    return out


def _back_recurrent(d_hw, wt, dtype):
    """The cotangent of ``h`` from those of ``_recurrent``'s outputs: ``sum_k d_k @ w_k.T``.

    ``wt`` holds the blocks already transposed (``_in_loop_weights``).
    """
    return functools.reduce(jnp.add, (_matmul(d, wk, dtype) for d, wk in zip(d_hw, wt)))


def _in_loop_weights(w, dtype, transpose: bool = False) -> tuple:
    """The recurrent weights as the loop body reads them, prepared once before the loop.

    Matrices are cast to the matmul dtype (and transposed for the backward) here, outside the
    scan: XLA:CPU does not reliably hoist these loop invariants, and a dot with a transposed
    operand inside the loop is ~10% slower than one on a pre-transposed copy. The optimization
    barrier stops XLA from folding the transpose back into the dot. Vectors (the GRU's
    ``b_hh`` blocks) stay float32. In bfloat16 on the AMX kernel, matrices are packed for it
    here instead (``amx.Packed``).
    """
    if dtype == jnp.bfloat16 and amx.enabled():
        return tuple(wk if wk.ndim != 2 else amx.pack(wk, transpose) for wk in w)
    w = tuple(wk if wk.ndim != 2 else wk.astype(dtype).T if transpose else wk.astype(dtype) for wk in w)
    return jax.lax.optimization_barrier(w) if transpose else w


def _output(h, w_out, b_out, dtype):
    """The dense output layer: vocabulary logits (float32) from the top layer's ``h`` (``w_out``
    may be packed for the step kernel: ``CharRNN.step_weights``)."""
    if isinstance(w_out, step_kernel.Panels):
        return step_kernel.dense(h, w_out, b_out)
    logits = _matmul(h, w_out, dtype)
    return logits + _bias(b_out, logits)


def _bias(b, x):
    """``b`` broadcast explicitly against ``x``'s leading axes (no implicit rank promotion)."""
    return jnp.expand_dims(b, tuple(range(x.ndim - 1)))


class RNNCell(Cell):
    """Elman cell: ``h' = tanh(x W_ih + b + h W_hh)``."""

    @staticmethod
    def forward(w, carry, xw, dtype):
        (h,) = carry
        (hw,) = _recurrent(h, w, dtype)
        h = jnp.tanh(xw[0] + hw)
        return (h,), ()

    @staticmethod
    def backward(wt, saved, prev, new, d_new, dtype):
        (h,), (dh,) = new, d_new
        dz = (dh * (1.0 - h * h),)
        return dz, dz, (_back_recurrent(dz, wt, dtype),)


class LSTMCell(Cell):
    """LSTM with gates ordered input, forget, cell, output (as PyTorch); carry is ``(c, h)``."""

    kind = "lstm"
    gates = 4
    state_arity = 2

    def layer(self, carry, x, keep_TxBx1, dtype=jnp.float32, unroll: int = 1):
        """``Cell.layer``; in float32 on a CPU with AVX-512 (and in bfloat16 where its bf16
        products run on AVX512-BF16), the whole window runs in one native call each way
        (``charrnn.lstm_kernel``), on whole ``(..., 4H)`` arrays: the gate blocks are kept apart
        only for XLA's scan (see ``_gate_blocks``)."""
        if ((dtype == jnp.float32 and lstm_kernel.enabled())
                or (dtype == jnp.bfloat16 and lstm_kernel.bf16_enabled())):
            # The kernel adds the bias itself (and sums its gradient from the same dz).
            return lstm_kernel.layer(self.w_hh[...], self.b_ih[...], tuple(carry),
                                     self.project_without_bias(x, dtype), keep_TxBx1, dtype=dtype)
        return super().layer(carry, x, keep_TxBx1, dtype, unroll)

    @staticmethod
    def forward(w, carry, xw, dtype):
        c, h = carry
        zi, zf, zg, zo = (x + r for x, r in zip(xw, _recurrent(h, w, dtype)))
        i, f, g, o = jax.nn.sigmoid(zi), jax.nn.sigmoid(zf), jnp.tanh(zg), jax.nn.sigmoid(zo)
        c = f * c + i * g
        h = o * jnp.tanh(c)
        return (c, h), (i, f, g, o)

    @staticmethod
    def backward(wt, saved, prev, new, d_new, dtype):
        i, f, g, o = saved
        c_prev, _ = prev
        c, _ = new
        dc, dh = d_new
        tc = jnp.tanh(c)
        dc = dc + dh * o * (1.0 - tc * tc)
        dz = (dc * g * i * (1.0 - i), dc * c_prev * f * (1.0 - f), dc * i * (1.0 - g * g),
              dh * tc * o * (1.0 - o))
        return dz, dz, (dc * f, _back_recurrent(dz, wt, dtype))


class GRUCell(Cell):
    """GRU as PyTorch defines it: ``n = tanh(x W_in + b_in + r * (h W_hn + b_hn))``."""

    kind = "gru"
    gates = 3
    folds_b_hh = False

    def __init__(self, in_features: int, hidden: int, *, one_hot: bool, rngs: nnx.Rngs):
        super().__init__(in_features, hidden, one_hot=one_hot, rngs=rngs)
        self.b_hh = nnx.Param(_uniform(rngs.params(), (3 * hidden,), hidden ** -0.5))

    def recurrent_weights(self) -> tuple:
        """``w_hh``'s gate blocks followed by ``b_hh``'s."""
        return _gate_blocks(self.w_hh[...], 3) + _gate_blocks(self.b_hh[...], 3)

    def step_recurrent_weights(self, dtype=jnp.float32) -> tuple:
        return super().step_recurrent_weights(dtype) + _gate_blocks(self.b_hh[...], 3)

    @staticmethod
    def forward(w, carry, xw, dtype):
        (h,) = carry
        hr, hz, hn = (r + _bias(b, h) for r, b in zip(_recurrent(h, w[:-3], dtype), w[-3:]))
        xr, xz, xn = xw
        r = jax.nn.sigmoid(xr + hr)
        z = jax.nn.sigmoid(xz + hz)
        n = jnp.tanh(xn + r * hn)
        h = (1.0 - z) * n + z * h
        return (h,), (r, z, n, hn)

    @staticmethod
    def backward(wt, saved, prev, new, d_new, dtype):
        r, z, n, hn = saved
        (h_prev,), (dh,) = prev, d_new
        dn = dh * (1.0 - z) * (1.0 - n * n)
        dr = dn * hn * r * (1.0 - r)
        dz = dh * (h_prev - n) * z * (1.0 - z)
        d_hw = (dr, dz, dn * r)
        return (dr, dz, dn), d_hw, (dh * z + _back_recurrent(d_hw, wt[:3], dtype),)


def _shift_in(first_BxH, seq_TxBxH):
    """``[first, seq[0], ..., seq[T-2]]``: the value each step read, from what each step wrote."""
    return jnp.concatenate([first_BxH[None], seq_TxBxH[:-1]], axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _scan_layer(cell, dtype, unroll, w, carry0, xw_TxBxH, keep_TxBx1):
    """One layer over a window: ``(final_carry, h_TxBxH)``. See ``Cell.scan``.

    ``w`` is ``cell.recurrent_weights()`` and ``xw_TxBxH`` the per-gate input projections.
    """
    w = _in_loop_weights(w, dtype)

    def body(c, inp):
        xw, keep = inp
        c, _ = cell.forward(w, tuple(a * keep for a in c), xw, dtype)
        return c, c[-1]

    return jax.lax.scan(body, carry0, (xw_TxBxH, keep_TxBx1), unroll=unroll)


def _scan_layer_fwd(cell, dtype, unroll, w, carry0, xw_TxBxH, keep_TxBx1):
    w_loop = _in_loop_weights(w, dtype)

    def body(c, inp):
        xw, keep = inp
        c, saved = cell.forward(w_loop, tuple(a * keep for a in c), xw, dtype)
        return c, (c, saved)

    final, (carries_TxBxH, saved_TxBxH) = jax.lax.scan(body, carry0, (xw_TxBxH, keep_TxBx1), unroll=unroll)
    return (final, carries_TxBxH[-1]), (w, carry0, carries_TxBxH, saved_TxBxH, keep_TxBx1)


def _scan_layer_bwd(cell, dtype, unroll, res, cotangents):
    w, carry0, carries_TxBxH, saved_TxBxH, keep_TxBx1 = res
    d_final, dh_TxBxH = cotangents
    # What each step read: the previous step's carry (carry0 for the first), reset by keep.
    prevs_TxBxH = tuple(_shift_in(a0, a) * keep_TxBx1 for a0, a in zip(carry0, carries_TxBxH))

    wt = _in_loop_weights(w, dtype, transpose=True)
    # Which d_hw blocks are the very same arrays as d_xw blocks (all of them for the LSTM and
    # the tanh RNN, two of three for the GRU): those are stacked once, not twice. Every stacked
    # output of a scan costs a per-step write and a zero-filled (T, B, H) buffer per call.
    shared = []

    def body(d_carry, inp):
        saved, prev, new, dh_out, keep = inp
        d_new = d_carry[:-1] + (d_carry[-1] + dh_out,)
        d_xw, d_hw, d_prev = cell.backward(wt, saved, prev, new, d_new, dtype)
        same = [next((j for j, x in enumerate(d_xw) if x is h), None) for h in d_hw]
        shared[:] = same
        return tuple(d * keep for d in d_prev), (d_xw, tuple(h for h, j in zip(d_hw, same) if j is None))

    d_carry0, (d_xw_TxBxH, d_hw_own) = jax.lax.scan(
        body, tuple(d_final), (saved_TxBxH, prevs_TxBxH, carries_TxBxH, dh_TxBxH, keep_TxBx1),
        reverse=True, unroll=unroll)
    own = iter(d_hw_own)
    d_hw_TxBxH = tuple(next(own) if j is None else d_xw_TxBxH[j] for j in shared)
    # The recurrent weights' gradients for all time steps at once, outside the loop: one
    # (H, T*B) @ (T*B, H) matmul per gate block (and a sum per ``b_hh`` block for the GRU).
    h_prev = prevs_TxBxH[-1].reshape(-1, prevs_TxBxH[-1].shape[-1])
    d_hw = tuple(d.reshape(h_prev.shape) for d in d_hw_TxBxH)
    d_w = tuple(_matmul(h_prev.T, d, dtype) for d in d_hw)
    if len(w) > len(d_w):  # the GRU's w also holds b_hh's gate blocks
        d_w += tuple(jnp.sum(d, axis=0) for d in d_hw)
    return d_w, d_carry0, d_xw_TxBxH, jnp.zeros_like(keep_TxBx1)


_scan_layer.defvjp(_scan_layer_fwd, _scan_layer_bwd)


CELL_TYPES = {"rnn": RNNCell, "lstm": LSTMCell, "gru": GRUCell}


def _dropout(x, rate: float, key, rows=None):
    """Inverted dropout of ``x_TxBxH``.

    ``rows`` is ``(first, total)`` when ``x`` holds rows ``first ..`` of a batch of ``total``
    rows (one device's part of a data-parallel batch). Each row's mask is drawn from its own
    key (``key`` folded with the row's index in the whole batch), so a device draws only its
    own rows and every row is dropped exactly as it would be on a single device. The mask is
    16 random bits per element against ``rate`` in 65536ths (a keep probability within 2**-17
    of ``1 - rate``): threefry, XLA:CPU's bottleneck here, then hashes half the words a
    float draw would (with a float draw of the whole batch on every device, dropout 0.25 cost
    a GRU 2x384's bf16 train step ~10%).
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
        return _output(h, self.w_out[...], self.b_out[...], dtype)

    def __call__(self, carry: Carry, tokens_BxT, *, dropout_key: Optional[Any] = None,
                 dtype=jnp.float32, unroll: int = 1, dropout_rows=None) -> tuple[Carry, Any]:
        """Run over a window of tokens.

        The state is reset to zero wherever a start token is read, so documents never see
        each other. Returns the carry after the window and ``logits_BxTxV`` (float32).
        ``dropout_rows``: ``(first_row, total_rows)`` when ``tokens_BxT`` is one device's rows
        of a larger batch, so that dropout matches the whole batch's (see ``_dropout``).
        """
        tokens_TxB = tokens_BxT.T
        keep_TxBx1 = (tokens_TxB != START)[..., None].astype(jnp.float32)
        keys = (jax.random.split(dropout_key, len(self.cells)) if dropout_key is not None
                else [None] * len(self.cells))
        x = tokens_TxB
        new_carry = []
        for cell, c0, key in zip(self.cells, carry, keys):
            c, h_TxBxH = cell.layer(c0, x, keep_TxBx1, dtype, unroll)
            new_carry.append(c)
            x = _dropout(h_TxBxH, self.config.dropout, key, dropout_rows)
        logits_TxBxV = self.logits(x, dtype)
        return tuple(new_carry), jnp.swapaxes(logits_TxBxV, 0, 1)

    def step(self, carry: Carry, token_B, dtype=jnp.float32) -> tuple[Carry, Any]:
        """Advance every layer by one token; returns the new carry and ``logits_BxV``.

        Unlike ``__call__`` it does not reset on a start token: the sampler starts from a
        fresh carry instead.
        """
        return self.step_with(self.step_weights(dtype, rows=token_B.shape[0]), carry, token_B, dtype)

    def step_weights(self, dtype=jnp.float32, threads: int = 1, rows: int = 1) -> tuple:
        """The weights ``step_with`` reads, prepared once outside a loop of steps (see
        ``Cell.step_weights``), for steps of ``rows`` rows on ``threads`` threads: in float32
        on the native step kernel where it pays (``step_kernel.pays``), else XLA's operations."""
        native = dtype == jnp.float32 and step_kernel.pays(rows, threads)
        w_out = step_kernel.pack(self.w_out[...], 1, threads) if native else self.w_out[...]
        return tuple(c.step_weights(dtype, threads, native) for c in self.cells), (w_out, self.b_out[...])

    def step_with(self, weights, carry: Carry, token_B, dtype=jnp.float32) -> tuple[Carry, Any]:
        """``step`` with ``step_weights``'s output; reads no parameter of the module itself."""
        cell_weights, (w_out, b_out) = weights
        x = token_B
        new_carry = []
        for cell, w, c in zip(self.cells, cell_weights, carry):
            c, x = cell.step_with(w, c, x, dtype)
            new_carry.append(c)
        return tuple(new_carry), _output(x, w_out, b_out, dtype)


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

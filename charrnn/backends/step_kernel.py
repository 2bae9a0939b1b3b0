"""One float32 time step of every layer and the output layer in native calls: sampling. Serves
every cell in float32 on CPUs with AVX-512.

The sampler runs the model one step at a time; inside XLA's loop a layer's step was a few small
dots and elementwise fusions, each dispatched on its own. ``kernels/rnn_cpu.cc`` runs a layer's
step as one call on weights packed once per sampling call (``pack``), the gates in registers;
``dense`` does the output layer. Every row's sums run in one fixed order whatever the batch, the
row's slot or the thread split, so a row samples the same text alone or in a crowd (XLA's dots
do not promise that: one row and two rows take different kernels). ``enabled()``: the LSTM
kernel's library is available (CPU, AVX-512, a compiler) and neither ``CHARRNN_STEP_KERNEL=0``
nor ``CHARRNN_KERNELS=0``. Equal to ``charrnn.cells`` to float32 rounding (tests/test_backends.py).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from charrnn.backends import lstm_window, native
from charrnn.config import CELLS, GATES

log = logging.getLogger(__name__)

KINDS = {kind: i for i, kind in enumerate(CELLS)}  # the kernel's Kind enum: kRnn, kLstm, kGru


@functools.cache
def enabled() -> bool:
    """Whether float32 sampling steps run on the native kernel in this process (decided once)."""
    if not native.allowed("CHARRNN_STEP_KERNEL") or lstm_window.library() is None:
        return False
    log.info("step kernel: float32 sampling steps run on charrnn's AVX-512 kernel")
    return True


@functools.partial(jax.tree_util.register_dataclass, data_fields=["data"], meta_fields=["n", "threads"])
@dataclasses.dataclass(frozen=True)
class Panels:
    """A weight of ``gates`` column blocks of width ``n`` as the kernel reads it (``pack``), and
    how many threads the steps that read it split their columns over."""

    data: Any  # (gates * ceil(n / 32), K, 32) float32
    n: int
    threads: int = 1


def pack(w, gates: int = 1, threads: int = 1) -> Panels:
    """``w`` (K, gates * N), gate blocks side by side, in the kernel's 32-column panels (each
    block's columns padded to a multiple of 32). A step reading it runs on ``threads`` threads
    (the caller's and helpers: see ``kernels/rnn_cpu.cc``'s ``Pool``); the result does not
    depend on it."""
    return Panels(lstm_window.pack_panels(w, gates), w.shape[1] // gates, threads)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["w_ih", "b_ih", "w_hh", "b_hh"],
                   meta_fields=["kind"])
@dataclasses.dataclass(frozen=True)
class StepWeights:
    """One layer's weights for ``cell_step``, prepared once for many steps.

    ``w_ih`` is the raw ``(V, G)`` matrix for a first layer (its step gathers rows of it) and
    ``pack``'s panels otherwise; ``b_hh`` is zeros for cells that fold it into ``b_ih``.
    """

    w_ih: Any
    b_ih: Any
    w_hh: Panels
    b_hh: Any
    kind: str


def cell_step(weights: StepWeights, carry: tuple, x, extra_BxG=None):
    """One step of a layer: ``x`` is token ids ``(B,)`` (first layer) or the layer below's
    ``h`` ``(B, I)``; ``carry`` is ``(h,)`` or, for the LSTM, ``(c, h)``. Returns the new carry.
    ``extra_BxG`` (first layer only): a further part of the input projection (a label term)."""
    h = carry[-1]
    c = carry[0] if weights.kind == "lstm" else h
    projected = not isinstance(weights.w_ih, Panels)
    if extra_BxG is not None and not projected:
        raise ValueError("an extra input projection is added to a first layer only")
    if projected:  # one_hot(x) @ w_ih == w_ih[x], gathered by XLA
        x, w_ih = jnp.take(weights.w_ih, x, axis=0), jnp.zeros((1,), jnp.float32)
        x = x if extra_BxG is None else x + extra_BxG
    else:
        w_ih = weights.w_ih.data
    out = jax.ShapeDtypeStruct(h.shape, jnp.float32)
    h, c = jax.ffi.ffi_call("charrnn_cell_step", (out, out))(
        x.astype(jnp.float32), w_ih, weights.b_ih, weights.w_hh.data, weights.b_hh, h, c,
        kind=np.int32(KINDS[weights.kind]), projected=np.int32(projected), threads=np.int32(weights.w_hh.threads))
    return (c, h) if weights.kind == "lstm" else (h,)


def dense(x_BxK, w: Panels, bias):
    """``x_BxK @ w + bias`` with ``w`` from ``pack(w)``: the output layer's logits."""
    return jax.ffi.ffi_call("charrnn_dense", jax.ShapeDtypeStruct((x_BxK.shape[0], w.n), jnp.float32))(
        x_BxK.astype(jnp.float32), w.data, bias, threads=np.int32(w.threads))


def prepare(kind: str, cells: list, w_out, b_out, threads: int = 1) -> tuple:
    """Every layer's ``StepWeights`` and the output layer's panels, packed once per sampling call;
    each step then splits its columns over ``threads`` threads."""
    gates = GATES[kind]
    out = []
    for i, p in enumerate(cells):
        w_ih = p["w_ih"] if i == 0 else pack(p["w_ih"], gates)
        b_hh = p["b_hh"] if "b_hh" in p else jnp.zeros_like(p["b_ih"])
        out.append(StepWeights(w_ih, p["b_ih"], pack(p["w_hh"], gates, threads), b_hh, kind))
    return tuple(out), (pack(w_out, 1, threads), b_out)


def step(weights, carry, token_B, extra_BxG=None):
    """One step of every layer from ``token_B`` and the output layer: ``(new_carry, logits_BxV)``;
    ``extra_BxG``: a further part of the first layer's input projection (a label term), or None."""
    cells, (w_out, b_out) = weights
    x, new_carry = token_B, []
    for i, (w, c) in enumerate(zip(cells, carry)):
        c = cell_step(w, tuple(c), x, extra_BxG if i == 0 else None)
        new_carry.append(c)
        x = c[-1]
    return tuple(new_carry), dense(x, w_out, b_out)

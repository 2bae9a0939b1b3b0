"""One float32 time step of a recurrent layer (and the output layer) in one native call: sampling.

The sampler feeds each drawn character back, so it runs the model one step at a time for a few
rows. Inside XLA's loop a step of a layer was one small dot per gate block of ``w_ih`` plus one
for ``w_hh`` and a few elementwise fusions, each dispatched on its own; at one row XLA's dots
ran at ~12 GFLOP/s (a GRU 2x256 step ~100-170 us). ``kernels/rnn_cpu.cc`` runs a layer's step
as one call: ``x @ w_ih`` and ``h @ w_hh`` on weights packed once per sampling call (``pack``,
outside the loop), the gates in AVX-512 registers; ``dense`` does the output layer.

``enabled()``: the float32 LSTM kernel's library is available (``lstm_kernel.library``: CPU
backend, AVX-512, a compiler) and ``CHARRNN_STEP_KERNEL`` is not ``0``; ``pays``: the steps
are a few rows or split over threads. ``CharRNN.step_weights`` then returns ``StepWeights``
and ``Cell.step_with`` calls ``cell_step``; otherwise both keep XLA's operations. Results agree with them to float32 rounding (tests/test_step_kernel.py).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from charrnn import lstm_kernel

log = logging.getLogger(__name__)

KINDS = {"rnn": 0, "lstm": 1, "gru": 2}


@functools.cache
def enabled() -> bool:
    """Whether float32 sampling steps run on the native kernel in this process (decided once)."""
    if os.environ.get("CHARRNN_STEP_KERNEL") == "0" or lstm_kernel.library() is None:
        return False
    log.info("step kernel: float32 sampling steps run on charrnn's AVX-512 kernel")
    return True


# Rows up to which one thread's step beats XLA's. At batch 1 a step is a matrix-vector product:
# XLA's small dots run it at ~12 GFLOP/s, the kernel at the speed the weights stream in. From
# ~4 rows the product is compute-bound and XLA's dots block it as well as the kernel does (one
# device, per model step, kernel / XLA: LSTM 2x128 4 rows 34-38 / 34-35 us, 8 rows 58-59 /
# 55-61 us, GRU 2x256 16 rows 301-319 / 250-252 us, RNN 1x512 16 rows 122-128 / 151-251 us).
MAX_ROWS_ONE_THREAD = 2


def pays(rows: int, threads: int) -> bool:
    """Whether steps of ``rows`` rows on ``threads`` threads should run on the kernel: it is
    ``enabled`` and either the step is a matrix-vector product (at most
    ``MAX_ROWS_ONE_THREAD`` rows) or it is split over threads (``parallel.sampling_threads``:
    the weights do not fit one core's L2, and each core then keeps its part cached)."""
    return enabled() and (threads > 1 or rows <= MAX_ROWS_ONE_THREAD)


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
    return Panels(lstm_kernel.pack_panels(w, gates), w.shape[1] // gates, threads)


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


def cell_step(weights: StepWeights, carry: tuple, x):
    """One step of a layer: ``x`` is token ids ``(B,)`` (first layer) or the layer below's
    ``h`` ``(B, I)``; ``carry`` is ``(h,)`` or, for the LSTM, ``(c, h)``. Returns the new carry."""
    h = carry[-1]
    c = carry[0] if weights.kind == "lstm" else h
    projected = not isinstance(weights.w_ih, Panels)
    if projected:  # one_hot(x) @ w_ih == w_ih[x], gathered by XLA
        x, w_ih = jnp.take(weights.w_ih, x, axis=0), jnp.zeros((1,), jnp.float32)
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

"""A whole LSTM layer over a training window in one native call each way. Serves LSTM layers
in float32 on CPUs with AVX-512, and in bfloat16 where the bf16 products run on AVX512-BF16.

XLA's scan runs each time step as ~15 separately dispatched operations; at the few dozen rows a
CPU device trains, that dispatch was about half a step. ``kernels/rnn_cpu.cc`` runs the window's
T steps in one XLA FFI call: per step one AVX-512 matmul of ``h`` with all four gate blocks, the
gates in registers; the backward likewise in reverse. The weight gradient (one matmul over all
steps) stays with XLA. ``enabled()``: CPU backend, AVX-512, the build worked, and neither
``CHARRNN_LSTM_KERNEL=0`` nor ``CHARRNN_KERNELS=0``. Equal to ``charrnn.cells`` to float32 rounding
(tests/test_backends.py); speed: docs/performance.md.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from charrnn import parallel
from charrnn.backends import bf16_matmul as amx
from charrnn.backends import native

log = logging.getLogger(__name__)

_FALLBACK = "float32 LSTM layers and sampling steps run on XLA's operations"
_PANEL = 32


@functools.cache
def library():
    """The built ``kernels/rnn_cpu.cc`` with its custom calls registered with XLA, or None where
    it cannot run here (not the CPU backend, no AVX-512, no compiler). Shared with
    ``charrnn.backends.step_kernel``; built on first use."""
    if jax.default_backend() != "cpu" or "avx512f" not in native.cpu_flags():
        return None
    lib = native.load("rnn_cpu", ["-O3", "-mavx512f", "-mfma"], _FALLBACK)
    if lib is None or not lib.charrnn_rnn_available():
        return None
    for name, fn in (("lstm_pack_transposed", lib.CharrnnLstmPackTransposed),
                     ("lstm_forward", lib.CharrnnLstmForward), ("lstm_backward", lib.CharrnnLstmBackward),
                     ("lstm_forward_bf16", lib.CharrnnLstmForwardBf16),
                     ("lstm_backward_bf16", lib.CharrnnLstmBackwardBf16),
                     ("pack_panels", lib.CharrnnPackPanels),
                     ("cell_step", lib.CharrnnCellStep), ("dense", lib.CharrnnDense)):
        jax.ffi.register_ffi_target(f"charrnn_{name}", jax.ffi.pycapsule(fn), platform="cpu")
    return lib


@functools.cache
def _load() -> bool:
    if not native.allowed("CHARRNN_LSTM_KERNEL") or library() is None:
        return False
    log.info("LSTM kernel: float32 LSTM layers run on charrnn's AVX-512 kernel")
    return True


def enabled() -> bool:
    """Whether float32 LSTM layers train on the native kernel in this process (decided once)."""
    return _load()


def bf16_enabled() -> bool:
    """Whether ``--dtype bfloat16`` LSTM layers train on the kernel's bf16 variant here: the
    float32 kernel is enabled and the bf16 matmuls run on AVX512-BF16 (``amx.unit()``).

    On AMX hosts the layers keep XLA's scan with a tile-kernel product per gate and step
    (measured there at 2.0-2.2x PyTorch's float32; this variant's vdpbf16ps product has not been
    measured against it on such a host)."""
    return enabled() and amx.enabled() and amx.unit() == "avx512_bf16"


def pack_panels(w, gates: int):
    """``w`` (K, gates * N), gate blocks side by side, in the kernels' 32-column panels, each
    block's columns padded to a multiple of 32: ``(gates * ceil(N / 32), K, 32)``."""
    k, g = w.shape
    shape = (gates * (-(-(g // gates) // _PANEL)), k, _PANEL)
    return jax.ffi.ffi_call("charrnn_pack_panels", jax.ShapeDtypeStruct(shape, jnp.float32))(
        w.astype(jnp.float32), gates=np.int64(gates))


def _pack_transposed(w_hh):
    """``w_hh`` (H, 4H) transposed, for the backward, in the kernel's 32-column panels (the
    forward reads ``pack_panels(w_hh, 4)``)."""
    h = w_hh.shape[0]
    shape = (-(-h // _PANEL), 4 * h, _PANEL)
    return jax.ffi.ffi_call("charrnn_lstm_pack_transposed", jax.ShapeDtypeStruct(shape, jnp.float32))(w_hh)


def _forward(threads, bf16, w_hh, bias, carry0, xw_TxBxG, keep_TxBx1):
    c0, h0 = carry0
    t, b, g = xw_TxBxG.shape
    out = jax.ShapeDtypeStruct((t, b, g // 4), jnp.float32)
    target, w = ("charrnn_lstm_forward_bf16", amx.pack(w_hh).data) if bf16 else ("charrnn_lstm_forward",
                                                                                 pack_panels(w_hh, 4))
    return jax.ffi.ffi_call(target, (out, out, jax.ShapeDtypeStruct((t, b, g), jnp.float32)))(
        xw_TxBxG, w, bias, c0, h0, keep_TxBx1, threads=np.int32(threads))


def layer(w_hh, bias, carry0, xw_TxBxG, keep_TxBx1, threads=None, dtype=jnp.float32):
    """One LSTM layer over a window: ``(final_carry, h_TxBxH)``, as ``Cell.layer`` computes it.

    ``w_hh``: ``(H, 4H)``, gate blocks i, f, g, o side by side; ``bias``: ``(4H,)``;
    ``carry0``: ``(c, h)``, each ``(B, H)``; ``xw_TxBxG``: the input projection, without the
    bias; ``keep_TxBx1``: 0 where the state is reset before a step, else 1. ``threads``: how
    many threads the rows are split over (default ``default_threads()``); the values do not
    depend on it. ``dtype`` bfloat16 (where ``bf16_enabled()``): the recurrent products take
    ``h`` (forward) and the gates' cotangent (backward) rounded to bfloat16 and ``w_hh`` in
    bfloat16, summed in float32, as XLA's scan does in bfloat16; everything else is float32.
    """
    return _layer(threads or default_threads(), jnp.dtype(dtype) == jnp.bfloat16, w_hh, bias, carry0,
                  xw_TxBxG, keep_TxBx1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _layer(threads, bf16, w_hh, bias, carry0, xw_TxBxG, keep_TxBx1):
    h_all, c_all, _ = _forward(threads, bf16, w_hh, bias, carry0, xw_TxBxG, keep_TxBx1)
    return (c_all[-1], h_all[-1]), h_all


def _layer_fwd(threads, bf16, w_hh, bias, carry0, xw_TxBxG, keep_TxBx1):
    h_all, c_all, gates = _forward(threads, bf16, w_hh, bias, carry0, xw_TxBxG, keep_TxBx1)
    return ((c_all[-1], h_all[-1]), h_all), (w_hh, carry0, h_all, c_all, gates, keep_TxBx1)


def _layer_bwd(threads, bf16, res, cotangents):
    w_hh, (c0, h0), h_all, c_all, gates, keep_TxBx1 = res
    (dc, dh), dh_all = cotangents
    bh = jax.ShapeDtypeStruct(c0.shape, jnp.float32)
    target, wt = (("charrnn_lstm_backward_bf16", amx.pack(w_hh, transpose=True).data) if bf16
                  else ("charrnn_lstm_backward", _pack_transposed(w_hh)))
    dz, d_bias, dc0, dh0 = jax.ffi.ffi_call(
        target, (jax.ShapeDtypeStruct(gates.shape, jnp.float32),
                 jax.ShapeDtypeStruct(gates.shape[-1:], jnp.float32), bh, bh))(
        wt, gates, c_all, c0, keep_TxBx1, dh_all, dc, dh, threads=np.int32(threads))
    # The recurrent weights' gradient for all steps at once, h_prev^T @ dz, where h_prev is
    # what each step read (the previous step's h, or h0, zeroed where reset).
    h_prev = (jnp.concatenate([h0[None], h_all[:-1]], axis=0) * keep_TxBx1).reshape(-1, h0.shape[-1])
    dz_2d = dz.reshape(h_prev.shape[0], -1)
    if bf16:  # as XLA's scan in bfloat16 does it (model._scan_layer_bwd): on the bf16 kernel
        d_w = amx.dot(h_prev.T.astype(jnp.bfloat16), dz_2d.astype(jnp.bfloat16))
    else:
        d_w = jnp.dot(h_prev.T, dz_2d)
    return d_w, d_bias, (dc0, dh0), dz, jnp.zeros_like(keep_TxBx1)


_layer.defvjp(_layer_fwd, _layer_bwd)


def default_threads() -> int:
    """Threads one device's layer call splits its rows over: this process's cores shared
    among its devices (one device per core, as ``charrnn train`` runs a batch of 16 or more
    rows on two cores: one thread each). One device alone on two cores: the layer's calls
    took 3.5-4.1 ms against 7.5-8.4 ms on one thread (LSTM 2x128, 50 rows x 50 steps)."""
    return max(1, parallel.usable_cores() // max(1, jax.local_device_count()))


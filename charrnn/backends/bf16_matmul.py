"""bfloat16 matmuls on the CPU's bf16 units: Intel AMX tiles where there are, else AVX512-BF16's
``vdpbf16ps`` (AMD Zen 4 and later). Serves ``--dtype bfloat16`` for every cell, on the CPU.

An XLA FFI custom call (``kernels/amx_matmul.cc``, built on first use by ``native``); both paths
read B in one packed layout (``pack``). ``enabled()``: CPU backend, a bf16 unit granted by the OS,
the build worked, and neither ``CHARRNN_AMX=0`` nor ``CHARRNN_KERNELS=0``. Both it and XLA's bf16
dot sum exact bfloat16 products in float32 (tests/test_backends.py; speed: docs/performance.md).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from charrnn.backends import native

log = logging.getLogger(__name__)

_TARGET = "charrnn_bf16_matmul"
_PACK_TARGET = "charrnn_amx_pack"
_FALLBACK = "bfloat16 matmuls use XLA's dot"


@functools.cache
def _load() -> str | None:
    """The bf16 unit the kernel runs on in this process ("amx" or "avx512_bf16"), or None."""
    if not native.allowed("CHARRNN_AMX") or jax.default_backend() != "cpu":
        return None
    units = _cpu_units()
    if not units:
        log.info("bf16 kernel: this CPU has neither AMX-BF16 nor AVX512-BF16; %s", _FALLBACK)
        return None
    lib = native.load("amx_matmul", ["-O2", "-mamx-tile", "-mamx-bf16"], _FALLBACK)
    if lib is None:
        return None
    checks = {"amx": (lib.charrnn_amx_available, "the OS does not grant the AMX tile state"),
              "avx512_bf16": (lib.charrnn_avx512bf16_available, "the OS does not enable the AVX-512 state")}
    unit = None
    for u in units:
        available, why = checks[u]
        if available():
            unit = u
            break
        log.info("bf16 kernel: %s", why)
    if unit is None:
        log.info("bf16 kernel: %s", _FALLBACK)
        return None
    matmul = lib.CharrnnAmxMatmul if unit == "amx" else lib.CharrnnDpbf16Matmul
    jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(matmul), platform="cpu")
    jax.ffi.register_ffi_target(_PACK_TARGET, jax.ffi.pycapsule(lib.CharrnnAmxPack), platform="cpu")
    log.info("bf16 kernel: bfloat16 matmuls run on %s", "AMX tiles" if unit == "amx" else "AVX512-BF16 (vdpbf16ps)")
    return unit


def _cpu_units() -> list:
    """The bf16 units the kernel can use by /proc/cpuinfo, best first: "amx", "avx512_bf16"."""
    flags = native.cpu_flags()
    return [u for u, need in (("amx", {"amx_bf16", "amx_tile"}), ("avx512_bf16", {"avx512_bf16"})) if need <= flags]


def enabled() -> bool:
    """Whether ``dot`` runs on the AMX kernel in this process (decided once, on first call)."""
    return _load() is not None


def unit() -> str | None:
    """The bf16 unit ``dot`` runs on here: "amx", "avx512_bf16", or None (XLA's dot)."""
    return _load()


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@functools.partial(jax.tree_util.register_dataclass, data_fields=["data"], meta_fields=["n"])
@dataclasses.dataclass(frozen=True)
class Packed:
    """A matrix as the kernel reads it (``pack``): ``data`` the packed array, ``n`` the columns
    of the original (the packed ones are padded to 16). ``n`` is static under ``jit``."""

    data: Any
    n: int


def pack(b, transpose: bool = False) -> Packed:
    """``b`` (K, N) -- or ``b.T`` when ``transpose``, ``b`` then being (N, K) -- as the kernel
    reads it: bfloat16, zero-padded to K % 32 == 0 and N % 16 == 0, in panels of 16 columns
    with column pairs interleaved along K; ``data`` of shape ``(N/16, K/2, 32)``. Pack a
    loop-invariant matrix once, outside the loop."""
    k, n = b.shape[::-1] if transpose else b.shape
    out = jax.ShapeDtypeStruct((_round_up(n, 16) // 16, _round_up(k, 32) // 2, 32), jnp.bfloat16)
    # In C (kernels/amx_matmul.cc): XLA:CPU runs this transpose at ~0.4 GB/s, which cost more
    # per train step than the matmuls it feeds.
    return Packed(jax.ffi.ffi_call(_PACK_TARGET, out)(b.astype(jnp.bfloat16), transpose=np.int32(transpose)), n)


def packed_dot(a_MxK, b: Packed):
    """``a @ b`` in float32 from bfloat16 ``a`` and ``b = pack(...)``. Not differentiable.

    ``a`` may have leading axes (``(T, B, K)``): they are flattened into rows. Any number of
    rows (the kernel configures its last tiles to the rows left); columns are zero-padded to the
    packed K.
    """
    if a_MxK.ndim != 2:
        lead = a_MxK.shape[:-1]
        return packed_dot(a_MxK.reshape(-1, a_MxK.shape[-1]), b).reshape(*lead, b.n)
    m, k = a_MxK.shape
    kp = b.data.shape[1] * 2
    a = a_MxK.astype(jnp.bfloat16)
    if kp != k:
        a = jnp.pad(a, ((0, 0), (0, kp - k)))
    c = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((m, b.data.shape[0] * 16), jnp.float32))(a, b.data)
    return c if c.shape[1] == b.n else c[:, :b.n]


def _plain_dot(a, b, transpose_b: bool = False):
    """``a @ b`` (``a @ b.T`` when ``transpose_b``) in float32, on the kernel when enabled."""
    if enabled():
        return packed_dot(a, pack(b, transpose_b))
    return jnp.dot(a, b.T if transpose_b else b, preferred_element_type=jnp.float32)


@jax.custom_vjp
def dot(a_MxK, b_KxN):
    """``a @ b`` in float32 from bfloat16 operands, on the AMX kernel where it can run.

    Differentiable: the incoming cotangent is rounded to bfloat16 (as autocast training does)
    and the operands' cotangents are the two transposed products, returned in bfloat16.
    """
    return _plain_dot(a_MxK, b_KxN)


def _dot_fwd(a, b):
    return _plain_dot(a, b), (a, b)


def _dot_bwd(res, d_c):
    a, b = res
    d_c = d_c.astype(jnp.bfloat16)
    a2, d2 = a.reshape(-1, a.shape[-1]), d_c.reshape(-1, d_c.shape[-1])
    return _plain_dot(d_c, b, transpose_b=True).astype(a.dtype), _plain_dot(a2.T, d2).astype(b.dtype)


dot.defvjp(_dot_fwd, _dot_bwd)


def matmul(x, w, dtype):
    """``x @ w`` with operands in ``dtype`` and a float32 result: on the bf16 kernel in bfloat16
    where it is enabled (``w`` may be ``pack``ed already), else XLA's dot.

    On 2-D views: the gradient of a dot over a (T, B, K) ``x`` contracts two axes, for which
    XLA:CPU first copied the whole cotangent into a transposed layout.
    """
    if isinstance(w, Packed):
        return packed_dot(x, w)
    if dtype == jnp.bfloat16 and enabled():
        return dot(x.astype(dtype), w.astype(dtype))
    lead = x.shape[:-1]
    y = jnp.dot(x.reshape(-1, x.shape[-1]).astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)
    return y.reshape(*lead, w.shape[-1])

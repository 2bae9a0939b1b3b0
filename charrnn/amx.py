"""bfloat16 matmuls on Intel AMX tiles, for ``--dtype bfloat16`` training on CPUs that have them.

XLA:CPU runs a bfloat16 dot of the shapes a recurrent step multiplies (a few dozen rows by a
512 x 512 gate block) at ~100-180 GFLOP/s on this project's Sapphire Rapids VM; a plain
tile kernel (``kernels/amx_matmul.cc``, one core) runs them at ~200-400. The kernel is an XLA
FFI custom call, compiled on first use with the system's C++ compiler into the user's cache
(``$XDG_CACHE_HOME/charrnn/kernels``) and loaded with ctypes.

``enabled()`` says whether it is in use: the default backend is the CPU, the CPU has AMX-BF16,
the operating system grants the tile state, the compiler ran, and ``CHARRNN_AMX`` is not
``0``. Otherwise the model multiplies with XLA's own bf16 dot. Both sum exact bfloat16
products in float32, so results agree to rounding: forward to float32 rounding, and the
gradients of products outside the recurrent loops to bfloat16 rounding, as ``dot`` rounds the
incoming cotangent to bfloat16 where XLA's rule keeps it in float32 (tests/test_amx.py: the
losses of bf16 training steps with and without the kernel agree to 2e-4).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "kernels" / "amx_matmul.cc"
_TARGET = "charrnn_amx_matmul"
_PACK_TARGET = "charrnn_amx_pack"


def _cache_dir() -> Path:
    if os.environ.get("CHARRNN_KERNEL_CACHE"):
        return Path(os.environ["CHARRNN_KERNEL_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "charrnn" / "kernels"


def _build() -> Optional[Path]:
    """The compiled kernel library (built once per source, JAX and compiler), or None."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        log.info("AMX kernel: no C++ compiler found; bfloat16 matmuls use XLA's dot")
        return None
    include = jax.ffi.include_dir()
    flags = ["-O2", "-std=c++17", "-shared", "-fPIC", "-w", "-mamx-tile", "-mamx-bf16", f"-I{include}"]
    key = hashlib.sha256("\0".join([_SOURCE.read_text(), jax.__version__, cxx, *flags]).encode()).hexdigest()[:16]
    out = _cache_dir() / f"amx_matmul-{key}.so"
    if out.is_file():
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # Compile beside the target and rename: a concurrent or interrupted build never leaves
        # a half-written library under the final name.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        try:
            subprocess.run([cxx, *flags, str(_SOURCE), "-o", tmp], check=True, capture_output=True, timeout=300)
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        log.warning("AMX kernel: build failed (%s %s); bfloat16 matmuls use XLA's dot",
                    e, detail.decode(errors="replace")[-500:])
        return None
    return out


@functools.cache
def _load() -> bool:
    if os.environ.get("CHARRNN_AMX") == "0" or jax.default_backend() != "cpu":
        return False
    if not _cpu_has_amx():
        return False
    path = _build()
    if path is None:
        return False
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        log.warning("AMX kernel: cannot load %s (%s); bfloat16 matmuls use XLA's dot", path, e)
        return False
    if not lib.charrnn_amx_available():
        log.info("AMX kernel: the OS does not grant the AMX tile state; bfloat16 matmuls use XLA's dot")
        return False
    jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(lib.CharrnnAmxMatmul), platform="cpu")
    jax.ffi.register_ffi_target(_PACK_TARGET, jax.ffi.pycapsule(lib.CharrnnAmxPack), platform="cpu")
    log.info("AMX kernel: bfloat16 matmuls run on AMX tiles (%s)", path)
    return True


def _cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split()
                    return "amx_bf16" in flags and "amx_tile" in flags
    except OSError:
        pass
    return False


def enabled() -> bool:
    """Whether ``dot`` runs on the AMX kernel in this process (decided once, on first call)."""
    return _load()


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def pack(b, transpose: bool = False):
    """``b`` (K, N) -- or ``b.T`` when ``transpose``, ``b`` then being (N, K) -- as the kernel
    reads it: bfloat16, zero-padded to K % 32 == 0 and N % 16 == 0, in panels of 16 columns
    with column pairs interleaved along K; shape ``(N/16, K/2, 32)``. Pack a loop-invariant
    matrix once, outside the loop."""
    k, n = b.shape[::-1] if transpose else b.shape
    out = jax.ShapeDtypeStruct((_round_up(n, 16) // 16, _round_up(k, 32) // 2, 32), jnp.bfloat16)
    # In C (kernels/amx_matmul.cc): XLA:CPU runs this transpose at ~0.4 GB/s, which cost more
    # per train step than the matmuls it feeds.
    return jax.ffi.ffi_call(_PACK_TARGET, out)(b.astype(jnp.bfloat16), transpose=np.int32(transpose))


def packed_dot(a_MxK, b_packed, n: int):
    """``(a @ b)[..., :n]`` in float32 from bfloat16 ``a`` and ``pack(b)``. Not differentiable.

    ``a`` may have leading axes (``(T, B, K)``): they are flattened into rows. Any number of
    rows (the kernel configures its last tiles to the rows left); columns are zero-padded to the
    packed K.
    """
    if a_MxK.ndim != 2:
        lead = a_MxK.shape[:-1]
        return packed_dot(a_MxK.reshape(-1, a_MxK.shape[-1]), b_packed, n).reshape(*lead, n)
    m, k = a_MxK.shape
    kp = b_packed.shape[1] * 2
    a = a_MxK.astype(jnp.bfloat16)
    if kp != k:
        a = jnp.pad(a, ((0, 0), (0, kp - k)))
    c = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((m, b_packed.shape[0] * 16), jnp.float32))(a, b_packed)
    return c if c.shape[1] == n else c[:, :n]


def _plain_dot(a, b, transpose_b: bool = False):
    """``a @ b`` (``a @ b.T`` when ``transpose_b``) in float32, on the kernel when enabled."""
    if enabled():
        return packed_dot(a, pack(b, transpose_b), b.shape[0 if transpose_b else 1])
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

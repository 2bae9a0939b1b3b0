"""Peak matmul throughput of this machine, the ceiling for charrnn's benchmark.

``measure`` times a large square ``n x n @ n x n`` matmul repeatedly for a few
seconds and reports GFLOP/s (``2 * n**3`` FLOPs per call) of the fastest call.

Backends:

* ``numpy`` (float32 only): numpy's bundled OpenBLAS. Its thread count is set
  through OpenBLAS's own ``set_num_threads`` entry point and restored afterwards.
* ``torch`` (float32 or bfloat16): ``torch.matmul`` (MKL / oneDNN), with
  ``torch.set_num_threads``, also restored afterwards. Used by default for
  bfloat16, which numpy cannot multiply natively.

OpenBLAS picks its kernel when it is loaded, from ``OPENBLAS_CORETYPE`` (forces
a core type, e.g. ``Haswell`` instead of the detected ``SkylakeX``) and
``OPENBLAS_L2_SIZE`` (cache size used for blocking). The environment this
project runs in may set both; unsetting them in the benchmark command (``env -u
OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/matmul_peak.py``)
changes numpy's kernel and therefore its numbers. ``measure`` never modifies
the environment; the CLI reports both variables and the core OpenBLAS chose, so
a result can be read against them. Because numpy's figure depends on this, the
CLI reports torch's float32 figure too.

Run alone: ``python benchmarks/matmul_peak.py [--threads 2] [--n 2048]
[--seconds 2]`` prints one JSON line.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import time
from typing import Callable

import numpy as np

_OPENBLAS_SET_THREADS = ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_",
                         "openblas_set_num_threads")
_OPENBLAS_GET_THREADS = ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_",
                         "openblas_get_num_threads")
_OPENBLAS_CORENAME = ("scipy_openblas_get_corename64_", "openblas_get_corename64_",
                      "openblas_get_corename")


def _openblas_symbol(names: tuple[str, ...]):
    """Return the first of ``names`` exported by numpy's bundled OpenBLAS."""
    libs_dir = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs")
    for path in sorted(glob.glob(os.path.join(libs_dir, "*openblas*.so*"))):
        lib = ctypes.CDLL(path)
        for name in names:
            if hasattr(lib, name):
                return getattr(lib, name)
    raise RuntimeError(f"numpy's OpenBLAS not found in {libs_dir}; cannot control its threads")


def openblas_corename() -> str:
    """The kernel core type numpy's OpenBLAS selected (e.g. ``SkylakeX``)."""
    fn = _openblas_symbol(_OPENBLAS_CORENAME)
    fn.restype = ctypes.c_char_p
    return fn().decode()


def _best_seconds(call: Callable[[], object], seconds: float) -> float:
    """Fastest wall time of ``call`` over ``seconds`` of repetitions (at least 3)."""
    call()  # warm-up: thread pool start, kernel selection, page faults
    best = float("inf")
    start = time.perf_counter()
    calls = 0
    while calls < 3 or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - t0)
        calls += 1
    return best


def _numpy_seconds(threads: int, n: int, seconds: float) -> float:
    set_threads = _openblas_symbol(_OPENBLAS_SET_THREADS)
    previous = _openblas_symbol(_OPENBLAS_GET_THREADS)()
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    set_threads(threads)
    try:
        return _best_seconds(lambda: a @ b, seconds)
    finally:
        set_threads(previous)


def _torch_seconds(threads: int, dtype: str, n: int, seconds: float) -> float:
    import torch

    previous = torch.get_num_threads()
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(getattr(torch, dtype))
    b = torch.randn(n, n, generator=gen).to(getattr(torch, dtype))
    torch.set_num_threads(threads)
    try:
        return _best_seconds(lambda: torch.matmul(a, b), seconds)
    finally:
        torch.set_num_threads(previous)


def measure(threads: int = 2, dtype: str = "float32", n: int = 2048, seconds: float = 2.0,
            backend: str | None = None) -> float:
    """Peak GFLOP/s of an ``n x n`` matmul in ``dtype`` using ``threads`` threads.

    ``backend`` is ``"numpy"`` or ``"torch"``; by default numpy for float32 and
    torch for bfloat16. Runs for about ``seconds`` and returns the rate of the
    fastest call. Does not modify the environment (see the module docstring
    on ``OPENBLAS_CORETYPE`` / ``OPENBLAS_L2_SIZE``).
    """
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    backend = backend or ("numpy" if dtype == "float32" else "torch")
    if backend == "numpy":
        if dtype != "float32":
            raise ValueError("the numpy backend only measures float32")
        best = _numpy_seconds(threads, n, seconds)
    elif backend == "torch":
        best = _torch_seconds(threads, dtype, n, seconds)
    else:
        raise ValueError(f"backend must be 'numpy' or 'torch', got {backend!r}")
    return 2.0 * n**3 / best / 1e9


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args(argv)
    result: dict[str, object] = {
        "threads": args.threads,
        "n": args.n,
        "env": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")},
        "openblas_core": openblas_corename(),
        "numpy_float32_gflops": measure(args.threads, "float32", args.n, args.seconds),
    }
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        for dtype in ("float32", "bfloat16"):
            result[f"torch_{dtype}_gflops"] = measure(args.threads, dtype, args.n, args.seconds,
                                                      backend="torch")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Building charrnn's C++ kernels (``backends/kernels/*.cc``) for XLA:CPU, on first use.

Each kernel is an XLA FFI custom call compiled with the system's C++ compiler into the user's
cache (``$CHARRNN_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/charrnn/kernels``), keyed by the
source, the JAX version, the compiler and its flags, and loaded with ctypes. A machine without
a compiler, or where the build fails, runs XLA's own operations instead (one log line). A failed
build is remembered in the cache (``*.failed``), so every later process skips it; a cached
library that no longer loads is rebuilt once.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import jax

log = logging.getLogger(__name__)

KERNELS = Path(__file__).parent / "kernels"


def cache_dir() -> Path:
    if os.environ.get("CHARRNN_KERNEL_CACHE"):
        return Path(os.environ["CHARRNN_KERNEL_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "charrnn" / "kernels"


def allowed(variable: str) -> bool:
    """Whether a native kernel may run: ``CHARRNN_KERNELS=0`` turns every kernel off (XLA's own
    operations then run everything), ``variable=0`` (``CHARRNN_AMX``, ``CHARRNN_LSTM_KERNEL``,
    ``CHARRNN_STEP_KERNEL``) just that one."""
    return os.environ.get("CHARRNN_KERNELS") != "0" and os.environ.get(variable) != "0"


def build(name: str, flags: Sequence[str], what: str, rebuild: bool = False) -> Optional[Path]:
    """The compiled library of ``kernels/<name>.cc`` (built once per source, JAX and compiler),
    or None when there is no compiler or the build fails. ``what`` names the fallback in logs."""
    source = KERNELS / f"{name}.cc"
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        log.info("%s kernel: no C++ compiler found; %s", name, what)
        return None
    flags = ["-std=c++17", "-shared", "-fPIC", "-w", *flags, f"-I{jax.ffi.include_dir()}"]
    # The headers beside the sources are part of every source (kernels/*.h).
    headers = [h.read_text() for h in sorted(KERNELS.glob("*.h"))]
    key = hashlib.sha256("\0".join([source.read_text(), *headers, jax.__version__, cxx, *flags]).encode()).hexdigest()[:16]
    out = cache_dir() / f"{name}-{key}.so"
    failed = out.with_suffix(".failed")
    if out.is_file() and not rebuild:
        return out
    if failed.is_file():
        log.info("%s kernel: its build failed before (%s); %s", name, failed, what)
        return None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # Compile beside the target and rename: a concurrent or interrupted build never leaves
        # a half-written library under the final name.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        try:
            subprocess.run([cxx, *flags, str(source), "-o", tmp], check=True, capture_output=True, timeout=300)
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except (OSError, subprocess.SubprocessError) as e:
        detail = (getattr(e, "stderr", b"") or b"").decode(errors="replace")[-500:]
        log.warning("%s kernel: build failed (%s %s); %s", name, e, detail, what)
        try:  # remembered, so that every later process does not try again
            failed.write_text(f"{e}\n{detail}\n")
        except OSError:
            pass
        return None
    return out


def load(name: str, flags: Sequence[str], what: str) -> Optional[ctypes.CDLL]:
    """``build`` and load with ctypes; None (logged) where either fails."""
    path = build(name, flags, what)
    for attempt in range(2):
        if path is None:
            return None
        try:
            return ctypes.CDLL(str(path))
        except OSError as e:
            log.warning("%s kernel: cannot load %s (%s); %s", name, path, e,
                        "rebuilding it" if attempt == 0 else what)
            path = build(name, flags, what, rebuild=True) if attempt == 0 else None
    return None


def cpu_flags() -> set[str]:
    """The CPU feature flags /proc/cpuinfo lists (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split()[2:])
    except OSError:
        pass
    return set()

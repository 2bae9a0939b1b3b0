"""Everything that tunes the host process, in one place; only the ``charrnn`` command calls it.

The library (``charrnn.train``, ``charrnn.load``, ``Run.sample`` ...) leaves the process as it
found it: environment, malloc settings, signal handlers, descriptors. What makes the command
line fast or prompt is process-wide, so it lives here and the CLI's entry point opts in:

- ``keep_freed_memory``: glibc malloc keeps freed blocks between train steps and hands back
  what compiling left (``malloc_trim`` after every XLA compilation).
- ``rerun_with_huge_pages``: re-execute ``charrnn train`` with glibc's huge-page tunable
  (``huge_pages_env`` says when that helps).
- ``use_training_xla_flags``: XLA:CPU's memory-saving schedule, XLA:GPU's deterministic ops.
- ``use_cpu_devices``: split the CPU into data-parallel devices.
- ``use_compile_cache``: XLA's persistent compilation cache.
- ``install_signal_handling``: Ctrl-C / SIGTERM end the command within about a second from the
  first instant, even while the main thread is inside a long C call (an XLA compile).

This module imports nothing heavy at import time: ``charrnn --help`` never starts JAX.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
from typing import Mapping, Optional

log = logging.getLogger(__name__)
SIGNAL_EXIT = {"SIGINT": 130, "SIGTERM": 143}


# --- malloc -------------------------------------------------------------------------------------

def keep_freed_memory() -> None:
    """Let glibc's malloc keep freed blocks between steps, but hand back what compiling left.

    XLA:CPU allocates every step's temporaries (tens of MB: the scans' stacked per-step
    values) afresh. By default glibc serves blocks of 128 KiB and up with ``mmap`` and gives
    them back on ``free``, so each step touches ~50 MB of new pages: ~12k page faults, the
    kernel zeroing every page, and the first write to each buffer running at a few GB/s. Kept
    in the heap, the same memory is reused step after step (measured: 12.4k -> 0 faults per
    LSTM 2x128 step).

    Kept, though, the heap also holds on to the ~100-250 MB that compiling a train step frees
    (LLVM's working memory), and XLA then maps the step's temporaries (one block, 390 MB for
    LSTM 2x512 at batch 64) on top of it: that, not the model, made the peak RSS. So after
    every XLA compilation the free heap goes back to the kernel (``malloc_trim``); the step
    that follows refills the heap with what it reuses. LSTM 2x512, batch 64: peak RSS 890 ->
    785 MB. A no-op where the C library is not glibc.

    The mmap threshold cannot go above 32 MiB, and a step's temporaries are often one larger
    block per device, which glibc then still mapped and unmapped on every step (27k page faults
    per step, ~23% of the step's time in the kernel). ``M_MMAP_MAX = 0`` serves every block
    from the heap (glibc still maps what a thread's own arena cannot hold, over 64 MiB), so
    those blocks are reused too (GRU 2x256 float32 25.8k -> 34.0k chars/s). One arena for every
    thread (``M_ARENA_MAX = 1``) would keep the larger blocks too, but the one heap fragments
    (LSTM 2x512's peak RSS 672 -> 848 MB): not taken. Figures: docs/performance.md.

    Process-wide and lasting, hence here: ``charrnn train`` calls it; a library user who wants
    the same speed calls it once, knowingly.
    """
    if keep_freed_memory.done:
        return
    keep_freed_memory.done = True
    if hugetlb_asked():
        log.info("malloc: GLIBC_TUNABLES=%s", os.environ["GLIBC_TUNABLES"])
    try:
        libc = ctypes.CDLL(None)
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -2, -3, -4
    mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's largest allowed value
    mallopt(M_MMAP_MAX, 0)  # and larger blocks from the heap too
    mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1)
    mallopt(M_TOP_PAD, 16 << 20)
    release_freed_memory.trim = trim
    import jax

    jax.monitoring.register_event_duration_secs_listener(_after_compile)


keep_freed_memory.done = False
_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def _after_compile(event: str, duration_secs: float, **kwargs) -> None:
    if event == _BACKEND_COMPILE_EVENT:
        release_freed_memory()


def release_freed_memory() -> None:
    """Return the heap's free pages to the kernel (glibc's ``malloc_trim``)."""
    if release_freed_memory.trim is not None:
        release_freed_memory.trim(0)


release_freed_memory.trim = None


# --- huge pages ---------------------------------------------------------------------------------
# Transparent huge pages for a training process's large malloc blocks (glibc's ``hugetlb`` tunable).
#
# A train step's temporaries are a few blocks per device that outgrow what a thread's malloc
# arena can hold (64 MiB), so glibc maps each afresh with ``mmap`` on every step and unmaps it on
# ``free`` (``keep_freed_memory`` keeps every smaller block). In 4 KiB pages that is one page
# fault, and the kernel zeroing the page, per 4 KiB written: an LSTM 2x512 at batch 64 on two
# CPU devices took ~65k faults per step (bf16) and ~58k (float32). With
# ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` glibc asks for transparent huge pages
# (``madvise(MADV_HUGEPAGE)``) on what it maps, so the same blocks fault in 2 MiB at a time:
# ~1k faults per step; that step 12.7k -> 15.7k chars/s in bf16 and 7.5k -> 8.9k in float32,
# peak RSS unchanged (675 -> 680 MB, 696 -> 693 MB).
#
# glibc reads its tunables once, when the process starts, so ``charrnn train`` re-executes
# itself with the tunable set (``rerun_with_huge_pages``) before doing anything else; a library
# user sets the variable before starting Python. Nothing happens where the C library is not
# glibc 2.35 or later, where the kernel's THP mode is not ``madvise`` (``always`` already gives
# huge pages; ``never`` gives none), or where ``GLIBC_TUNABLES`` already says anything about
# ``glibc.malloc.hugetlb`` (``glibc.malloc.hugetlb=0`` turns this off).

HUGETLB_TUNABLE = "glibc.malloc.hugetlb"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path: str = THP_MODE_FILE) -> Optional[str]:
    """The kernel's transparent-huge-page mode ("always", "madvise", "never"), or None."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def running_libc() -> tuple:
    """``(name, version)`` of the C library this process runs on, ``("glibc", "2.36")`` say, from
    the library itself (``confstr``; ``platform.libc_ver()`` instead scans the Python binary's
    file for version strings); ``("", "")`` where it does not say."""
    try:
        name, _, version = (os.confstr("CS_GNU_LIBC_VERSION") or "").partition(" ")
    except (ValueError, OSError, AttributeError):
        return "", ""
    return name, version


def _glibc_has_hugetlb(libc: tuple) -> bool:
    name, version = libc
    if name != "glibc":
        return False
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (2, 35)  # the release that added glibc.malloc.hugetlb


def hugetlb_asked(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process's environment says anything about glibc's hugetlb tunable."""
    return HUGETLB_TUNABLE in environ.get("GLIBC_TUNABLES", "")


def huge_pages_env(environ: Mapping[str, str] = os.environ, mode: Optional[str] = None,
                   libc: Optional[tuple] = None) -> Optional[dict]:
    """The environment to re-run a training process in so that glibc maps its large blocks in
    transparent huge pages, or None where that would change nothing (see the section's text).

    ``mode`` and ``libc`` default to this machine's (``thp_mode()``, ``running_libc()``).
    """
    if not sys.platform.startswith("linux") or hugetlb_asked(environ):
        return None
    if (mode if mode is not None else thp_mode()) != "madvise":
        return None
    if not _glibc_has_hugetlb(libc if libc is not None else running_libc()):
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = ":".join(t for t in (environ.get("GLIBC_TUNABLES", ""), f"{HUGETLB_TUNABLE}=1") if t)
    return env


def rerun_with_huge_pages() -> None:
    """Replace this process by itself with glibc's huge-page tunable set, where
    ``huge_pages_env`` says it helps.

    Only the console-script entry point calls this: it re-runs ``sys.orig_argv``, which for a
    user's script calling ``charrnn.cli.main()`` would run the script's top again. Returns
    (doing nothing) where it would not help or the re-execution cannot start. The process keeps
    its id, arguments, open files and working directory.
    """
    env = huge_pages_env()
    if env is None:
        return
    argv = list(getattr(sys, "orig_argv", []) or [sys.executable, *sys.argv])
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, argv, env)
    except OSError:
        return


# --- XLA and JAX ----------------------------------------------------------------------------------

MEMORY_SAVING_SCHEDULE = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
DETERMINISTIC_GPU_OPS = "--xla_gpu_deterministic_ops=true"


def backends_started() -> bool:
    """Whether JAX has initialised its backends: from then on the device count and XLA's
    flags are fixed for the process. Never imports JAX itself."""
    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge  # no public "are backends up?" query

    return xla_bridge.backends_are_initialized()


def use_memory_saving_schedule() -> bool:
    """Have XLA:CPU order each program's operations to keep the fewest buffers alive.

    Its default scheduler starts independent work as early as it can, for parallelism: in a
    train step that includes allocating the zero-filled output stacks of every scan before the
    forward pass, so they all live at once. The memory-minimising one keeps LSTM 2x512 (batch
    64) at 261 MB of temporaries instead of 392 (peak RSS 785 -> 650 MB), and the train steps
    ran as fast. It must run before JAX initialises its backends (XLA reads its flags once).
    Returns whether it took effect. Only XLA:CPU reads the flag.
    """
    return _add_xla_flag(MEMORY_SAVING_SCHEDULE)


def use_deterministic_gpu_ops() -> bool:
    """Have XLA:GPU compute every operation the same way on every run.

    Exact resume needs a train step that gives the same bits for the same inputs; on a GPU the
    gradient of the input layer's row gather is a scatter-add run with atomic additions in
    whatever order the threads arrive. With the flag XLA sorts them instead. Like
    ``use_memory_saving_schedule`` it must run before JAX initialises its backends, and returns
    whether it took effect; XLA:CPU ignores it.
    """
    return _add_xla_flag(DETERMINISTIC_GPU_OPS)


def use_training_xla_flags() -> None:
    """Both of the above: the XLA flags a training process asks for before JAX starts."""
    use_memory_saving_schedule()
    use_deterministic_gpu_ops()


def _add_xla_flag(flag: str) -> bool:
    flags = os.environ.get("XLA_FLAGS", "")
    if flag.split("=")[0] in flags or backends_started():
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()
    return True


def use_cpu_devices(n: int) -> bool:
    """Make JAX's CPU platform ``n`` devices. Must run before JAX initialises its backends.

    Returns False (and changes nothing) when ``XLA_FLAGS`` already forces a CPU device count or
    the backends are already initialised; the devices JAX has are then used as they are.
    """
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "") or backends_started():
        return False
    import jax

    jax.config.update("jax_num_cpu_devices", int(n))
    return True


def use_compile_cache() -> None:
    """Persist XLA's compilation cache so a second ``charrnn sample`` starts in a second or two.

    ``$CHARRNN_XLA_CACHE`` names the folder (default ``~/.cache/charrnn/xla``);
    ``CHARRNN_NO_XLA_CACHE=1`` turns it off. An unwritable folder only costs start-up time.
    """
    if os.environ.get("CHARRNN_NO_XLA_CACHE") == "1":
        return
    base = os.environ.get("CHARRNN_XLA_CACHE")
    if not base:
        root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = os.path.join(root, "charrnn", "xla")
    try:
        os.makedirs(base, exist_ok=True)
    except OSError:
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", base)
    # Our programs compile in well under JAX's 1 s default threshold; cache them all.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# --- signals --------------------------------------------------------------------------------------

class SignalWatcher:
    """Ctrl-C and SIGTERM end the command promptly, whatever the main thread is doing.

    Python runs a signal handler only between bytecodes of the main thread, so a Ctrl-C during
    an XLA compile (seconds in C++) would wait for it. Here the C-level handler writes the
    signal's number to a pipe (``signal.set_wakeup_fd``) at once, and a small thread reading
    the pipe acts on it:

    - while Python imports (before the CLI can catch anything) it prints one line and ends
      the process at once with 130 (SIGINT) or 143 (SIGTERM);
    - once the CLI runs (``unwind``: importing, compiling, evaluating, sampling: nothing worth
      saving) Python's handler raises ``Interrupted`` in the main thread, so ``finally`` blocks
      run (a download removes its partial file) and the CLI prints one line and exits with the
      same codes; if the main thread has not ended the process ``GRACE_S`` later (it is inside
      a long C call: an XLA compile), the watcher prints the line and ends it;
    - while a training loop that can stop cleanly is running (``cooperate``), the first signal
      only sets ``reason``, which the loop polls: it finishes the step, saves, and exits with the
      same codes. A second Ctrl-C ends the process at once (commits are atomic: the last
      checkpoint is intact).
    """

    def __init__(self):
        self.reason: Optional[str] = None
        self.cooperative = False
        self._lock = threading.Lock()
        self._deadline_armed = False
        self.unwind = False

    def install(self) -> "SignalWatcher":
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        for fd in (read_fd, write_fd):
            os.set_inheritable(fd, False)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._python_handler)  # the C-level handler also writes the pipe
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, args=(read_fd,), name="charrnn-signals", daemon=True).start()
        return self

    def _watch(self, read_fd: int) -> None:
        while True:
            try:
                data = os.read(read_fd, 64)
            except InterruptedError:
                continue
            except OSError:
                return
            if not data:
                return
            for signum in data:
                self.handle(signum)

    def handle(self, signum: int) -> None:
        """Act on one delivered signal (the watcher thread calls this)."""
        try:
            name = signal.Signals(signum).name
        except ValueError:
            return
        if name not in SIGNAL_EXIT:
            return
        with self._lock:
            if not self.cooperative:
                if not self.unwind or self._deadline_armed:  # nothing to unwind, or a second signal
                    _exit_now(f"{name} received; stopped", SIGNAL_EXIT[name])
                self._deadline_armed = True
                timer = threading.Timer(GRACE_S, _exit_now, (f"{name} received; stopped", SIGNAL_EXIT[name]))
                timer.daemon = True  # a main thread that unwinds in time exits without waiting for it
                timer.start()
                return
            if self.reason is not None:
                if name == "SIGINT":
                    _exit_now("interrupted again; exiting now (the last checkpoint is intact)", 130)
                return
            self.reason = name
        os.write(2, f"\ncharrnn: {name} received; finishing this step and saving a checkpoint "
                    f"(Ctrl-C again to quit at once)\n".encode())


    def _python_handler(self, signum, frame) -> None:
        """Runs in the main thread between bytecodes: outside a cooperating training loop it
        unwinds the main thread (``Interrupted``); inside, the watcher has set the flag."""
        if self.unwind and not self.cooperative:
            name = signal.Signals(signum).name
            if _importing(frame):
                # Raised inside a module's initialisation the exception would surface as that
                # module's ImportError (numpy's C extension wraps it); there is nothing to clean.
                _exit_now(f"{name} received; stopped", SIGNAL_EXIT.get(name, 130))
            raise Interrupted(name, SIGNAL_EXIT.get(name, 130))


def _importing(frame) -> bool:
    """Whether the main thread, stopped at ``frame``, is inside an ``import``."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


GRACE_S = 1.0  # how long the main thread has to unwind after a signal before the watcher ends it


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread by a SIGINT or SIGTERM; ``exit_code`` is 130 or 143."""

    def __init__(self, signal_name: str, exit_code: int):
        super().__init__(signal_name)
        self.signal_name, self.exit_code = signal_name, exit_code


def _exit_now(message: str, code: int) -> None:
    try:
        os.write(2, f"\ncharrnn: {message}\n".encode())
    finally:
        os._exit(code)


_WATCHER: Optional[SignalWatcher] = None


def install_signal_handling() -> Optional[SignalWatcher]:
    """Install the process's ``SignalWatcher`` (once; from the main thread). The CLI's entry
    point calls this before anything heavy is imported."""
    global _WATCHER
    if _WATCHER is None and threading.current_thread() is threading.main_thread():
        _WATCHER = SignalWatcher().install()
    return _WATCHER


def signal_watcher() -> Optional[SignalWatcher]:
    """The installed ``SignalWatcher``, or None (the library or a test runner in charge)."""
    return _WATCHER


def launched_as_command() -> bool:
    """Whether this process is the ``charrnn`` command itself (its console script, ``python -m
    charrnn``, ``python -m charrnn.cli`` or a checkout's ``cli.py``) rather than a user's program
    that imported charrnn.

    Only then may charrnn tune the process: re-executing it (which re-runs ``sys.orig_argv``: a
    user's script would run its top twice) or taking over its signals.
    """
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name in ("charrnn", "charrnn.__main__", "charrnn.cli"):
        return True
    path = getattr(main, "__file__", None) or ""
    package_dir = os.path.dirname(os.path.abspath(__file__))
    if os.path.abspath(path) == os.path.join(os.path.dirname(package_dir), "cli.py"):
        return True  # the checkout's launcher, cli.py beside the package
    if os.path.splitext(os.path.basename(path))[0] != "charrnn":
        return False
    try:  # the console script pip writes: a few lines that import charrnn.cli's main
        with open(path, "rb") as f:
            head = f.read(2048)
    except OSError:
        return False
    return b"charrnn.cli import main" in head

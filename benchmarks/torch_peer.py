"""Idiomatic PyTorch peer for charrnn's benchmark.

The model is what a PyTorch user would write for a char-level RNN that takes
one-hot input like charrnn: ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` with
``input_size=vocab`` and ``batch_first=True``, fed ``F.one_hot(x, vocab).float()``,
followed by ``nn.Linear(hidden, vocab)``. Training uses cross-entropy, Adam
(lr 2e-3), ``clip_grad_norm_(..., 5.0)`` and truncated BPTT (the hidden state
is carried across steps and detached). ``dtype="bfloat16"`` wraps forward and
loss in ``torch.autocast(device, dtype=torch.bfloat16)``; weights and optimizer
state stay float32. ``device="cuda"`` runs the same program on a GPU (cuDNN's
recurrent kernels; PyTorch lets cuDNN use TF32, as JAX's default does for
float32 matrix products), synchronising after every step.

PyTorch runs ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` on CPU through oneDNN
(``torch.backends.mkldnn``) by default. That is faster for training but, on
this machine, several times slower for single-step sampling than PyTorch's
native kernels, because each call sets up a oneDNN primitive. The default
(``mkldnn=True``) measures what a user gets out of the box; ``mkldnn=False``
(CLI ``--no-mkldnn``) measures the native kernels.

Training gets the process tuning ``charrnn train`` gives itself (``tune_process``: glibc malloc
options, and glibc's huge-page tunable where ``charrnn.runtime.huge_pages_env`` says it helps),
so charrnn's ratios are against PyTorch at its strongest; CLI ``--untuned`` measures a plain script.

Peak RSS (``ru_maxrss``) is per process, so for a clean figure run each
measurement in its own process through the CLI, which prints one JSON line::

    python benchmarks/torch_peer.py train --cell lstm --layers 2 --hidden 512 \\
        --seq-len 100 --batch 64 [--dtype bfloat16] [--steps 30] [--warmup 5]
    python benchmarks/torch_peer.py sample --cell lstm --layers 2 --hidden 512 \\
        --batch 32 [--length 2000]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import sys
import statistics
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

_CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
_GATES = {"lstm": 4, "gru": 3, "rnn": 1}
_DTYPES = ("float32", "bfloat16")
_DISTINCT_BATCHES = 4
_SAMPLE_WARMUP_STEPS = 20


class CharRNN(nn.Module):
    """Stacked recurrent layers over one-hot characters, then a linear head."""

    def __init__(self, cell: str, layers: int, hidden: int, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.rnn = _CELLS[cell](input_size=vocab, hidden_size=hidden, num_layers=layers,
                                batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor, h=None):
        out, h = self.rnn(F.one_hot(x, self.vocab).float(), h)
        return self.head(out), h


def _check(cell: str, dtype: str = "float32") -> None:
    if cell not in _CELLS:
        raise ValueError(f"cell must be one of {sorted(_CELLS)}, got {cell!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")


def _detach(h):
    """Cut the graph behind a hidden state (a tensor, or an LSTM ``(h, c)`` pair)."""
    return tuple(t.detach() for t in h) if isinstance(h, tuple) else h.detach()


@contextmanager
def _mkldnn(enabled: bool):
    """Enable or disable oneDNN kernels for the duration of the block."""
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous


def keep_freed_memory() -> bool:
    """Set the glibc malloc options ``charrnn train`` sets (``charrnn.runtime.keep_freed_memory``).

    Freed blocks stay in the heap for the next step instead of going back to the kernel and
    being faulted in, zeroed, again: mmap threshold at glibc's maximum (32 MiB), no mmap at
    all for larger blocks, no trimming, 16 MiB of top pad. PyTorch's CPU tensors come from
    glibc (``posix_memalign``), so they are served the same way. charrnn's copy also trims the
    heap after each XLA compilation, which has no PyTorch counterpart. Replicated here rather
    than imported: charrnn's function imports JAX, which would weigh on the peer's peak RSS.
    Returns False (changing nothing) where the C library is not glibc.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -2, -3, -4
    return all([mallopt(M_MMAP_THRESHOLD, 32 << 20), mallopt(M_MMAP_MAX, 0),
                mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1), mallopt(M_TOP_PAD, 16 << 20)])


def tune_process() -> dict:
    """Tune this process as ``charrnn train`` tunes its own, for a script's ``main``.

    First re-executes the process with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` where
    ``charrnn.runtime.huge_pages_env`` says that helps (glibc reads it only at start-up; skipped
    where charrnn is not importable), then sets ``keep_freed_memory``'s malloc options.
    Returns what took effect: ``{"malloc_tuned": bool, "hugetlb": bool}``.
    """
    try:
        from charrnn import runtime
    except ImportError:
        runtime = None
    env = runtime.huge_pages_env() if runtime is not None else None
    if env is not None:
        argv = list(getattr(sys, "orig_argv", []) or [sys.executable, *sys.argv])
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, argv, env)
    return {"malloc_tuned": keep_freed_memory(),
            "hugetlb": "glibc.malloc.hugetlb=1" in os.environ.get("GLIBC_TUNABLES", "")}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KB on Linux


def _sync(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def train_speed(cell: str, layers: int, hidden: int, seq_len: int, batch: int, vocab: int = 65,
                steps: int = 30, warmup: int = 5, threads: int = 2,
                dtype: str = "float32", mkldnn: bool = True, device: str = "cpu") -> dict:
    """Training throughput of the PyTorch peer on random data.

    Runs ``warmup`` untimed steps (at least one; the first is reported as
    ``first_step_s``) and then ``steps`` timed ones, cycling through a few
    distinct random ``(batch, seq_len)`` batches generated up front. Sets
    ``torch.set_num_threads(threads)`` for the process; ``mkldnn`` selects
    oneDNN or native recurrent kernels (see the module docstring).

    Returns ``chars_per_s`` (median over timed steps of ``batch*seq_len /
    step_time``), ``step_ms_median``, ``first_step_s`` and ``peak_rss_mb``
    (peak RSS of the whole process so far, after the run).
    """
    _check(cell, dtype)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = CharRNN(cell, layers, hidden, vocab).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    data = torch.randint(vocab, (_DISTINCT_BATCHES, 2, batch, seq_len)).to(device)
    use_bf16 = dtype == "bfloat16"
    h = None

    def step(i: int) -> None:
        nonlocal h
        x, y = data[i % _DISTINCT_BATCHES]
        with torch.autocast(device, dtype=torch.bfloat16, enabled=use_bf16):
            logits, h = model(x, h)
            loss = F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        h = _detach(h)

    times = []
    with _mkldnn(mkldnn):
        for i in range(max(warmup, 1) + steps):
            t0 = time.perf_counter()
            step(i)
            _sync(device)
            times.append(time.perf_counter() - t0)
    timed = times[max(warmup, 1):]
    return {
        "chars_per_s": statistics.median(batch * seq_len / t for t in timed),
        "step_ms_median": statistics.median(timed) * 1e3,
        "first_step_s": times[0],
        "peak_rss_mb": _peak_rss_mb(),
    }


def sample_speed(cell: str, layers: int, hidden: int, batch: int, length: int = 2000,
                 vocab: int = 65, threads: int = 2, mkldnn: bool = True, device: str = "cpu") -> dict:
    """Sampling throughput of the idiomatic PyTorch sampler.

    A Python loop of single steps under ``torch.inference_mode()``: model on the
    previous character, softmax, ``torch.multinomial``, next character. After
    20 untimed warm-up steps, times ``length`` steps of ``batch`` streams and
    returns ``{"chars_per_s": batch * length / time}``. ``mkldnn`` as in
    ``train_speed``.
    """
    _check(cell)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = CharRNN(cell, layers, hidden, vocab).to(device).eval()
    x = torch.zeros(batch, dtype=torch.long, device=device)
    h = None

    def step() -> None:
        nonlocal x, h
        logits, h = model(x[:, None], h)
        probs = F.softmax(logits[:, -1], dim=-1)
        x = torch.multinomial(probs, 1)[:, 0]

    with torch.inference_mode(), _mkldnn(mkldnn):
        for _ in range(_SAMPLE_WARMUP_STEPS):
            step()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(length):
            step()
        _sync(device)
        elapsed = time.perf_counter() - t0
    return {"chars_per_s": batch * length / elapsed}


def flops_per_char(cell: str, layers: int, hidden: int, vocab: int) -> float:
    """Training FLOPs per character: 3x the forward matmul FLOPs.

    Forward, per character, each layer costs ``2 * (in*G*H + H*G*H)`` with
    ``G`` = 4 (LSTM), 3 (GRU) or 1 (RNN) and ``in = H`` above the first layer,
    plus ``2*H*vocab`` for the output projection. The first layer's input
    projection counts as 0 FLOPs: charrnn implements the one-hot input as a
    gather of weight rows, not a dense ``vocab``-wide matmul (the PyTorch peer
    does do that matmul, so it performs more work than is counted here).
    Biases, nonlinearities and the softmax are not counted. Backward is taken
    as 2x forward.
    """
    _check(cell)
    gh = _GATES[cell] * hidden
    recurrent = 2 * hidden * gh * layers
    inputs = 2 * hidden * gh * (layers - 1)
    output = 2 * hidden * vocab
    return 3.0 * (recurrent + inputs + output)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("train", "sample"):
        p = sub.add_parser(name)
        p.add_argument("--cell", choices=sorted(_CELLS), default="lstm")
        p.add_argument("--layers", type=int, default=2)
        p.add_argument("--hidden", type=int, default=512)
        p.add_argument("--batch", type=int, default=64)
        p.add_argument("--vocab", type=int, default=65)
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--device", default="cpu", help="cpu, or cuda for a GPU")
        p.add_argument("--no-mkldnn", dest="mkldnn", action="store_false",
                       help="use PyTorch's native recurrent kernels instead of oneDNN")
        if name == "train":
            p.add_argument("--untuned", dest="tune", action="store_false",
                           help="skip the process tuning charrnn's training gets (tune_process)")
            p.add_argument("--seq-len", type=int, default=100)
            p.add_argument("--steps", type=int, default=30)
            p.add_argument("--warmup", type=int, default=5)
            p.add_argument("--dtype", choices=_DTYPES, default="float32")
        else:
            p.add_argument("--length", type=int, default=2000)
    args = vars(parser.parse_args(argv))
    command = args.pop("command")
    tuned = tune_process() if args.pop("tune", False) else {}
    fn = train_speed if command == "train" else sample_speed
    print(json.dumps({**fn(**args), **tuned}))


if __name__ == "__main__":
    main()

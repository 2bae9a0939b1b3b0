"""charrnn against PyTorch's cuDNN recurrent layers on one GPU, printed as a table.

    python benchmarks/gpu.py                       # all configurations, float32 and bfloat16
    python benchmarks/gpu.py --configs lstm-2x512 --steps 50

The same measurements as ``benchmarks/run.py`` (its workers, one subprocess each, charrnn and
PyTorch alternating), on the GPU JAX and PyTorch find: training chars/s (median over steps
after warm-up; bfloat16 is charrnn's ``--dtype bfloat16`` against PyTorch's autocast), and
sampling chars/s at batch 1 and 32 (2000 characters). Float32 matrix products run as each
library runs them by default on the GPU (both allow TF32 there). CPU figures: ``run.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run  # noqa: E402  (benchmarks/run.py: its workers and formatting)


def _cells(c: dict, t: dict) -> list[str]:
    """charrnn's chars/s, PyTorch's, their ratio and the first error of either, as table cells."""
    return [run._fmt(c.get("chars_per_s")), run._fmt(t.get("chars_per_s")),
            run._fmt(run._ratio(c, "chars_per_s"), "x"), c.get("error", t.get("error", ""))[:60]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default=",".join(run.CONFIGS), help="comma-separated names: " + ", ".join(run.CONFIGS))
    p.add_argument("--steps", type=int, default=30, help="timed training steps per run")
    p.add_argument("--repeat", type=int, default=1, help="alternating rounds (medians)")
    a = p.parse_args()
    rows = []
    for name in a.configs.split(","):
        cell, layers, hidden, seq_len, batch = run.CONFIGS[name]
        row = [name]
        for dtype in ("float32", "bfloat16"):
            c, t = run._alternate(
                a.repeat,
                lambda: run._run("charrnn-train", cell=cell, layers=layers, hidden=hidden, seq_len=seq_len,
                                 batch=batch, steps=a.steps, dtype=dtype),
                lambda: run._run("torch-train", cell=cell, layers=layers, hidden=hidden, seq_len=seq_len,
                                 batch=batch, steps=a.steps, dtype=dtype, device="cuda"))
            row += _cells(c, t)
        for b in (1, 32):
            c, t = run._alternate(
                a.repeat,
                lambda: run._run("charrnn-sample", cell=cell, layers=layers, hidden=hidden, batch=b),
                lambda: run._run("torch-sample", cell=cell, layers=layers, hidden=hidden, batch=b, device="cuda"))
            row += _cells(c, t)
        rows.append(row)
        print(" | ".join(row), flush=True)
    head = ["config"]
    for what in ("train f32", "train bf16", "sample b=1", "sample b=32"):
        head += [f"{what} charrnn", "torch", "ratio", "error"]
    print("\n| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()

"""Loss curves of one or more runs (``charrnn plot``); matplotlib is an optional extra."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from charrnn import runs
from charrnn.errors import CharrnnError


def plot_runs(run_dirs: Sequence[Path], out: Path, *, dpi: int = 100) -> Path:
    """Draw train and validation loss (bits/char) against step and against characters seen.

    Args:
        run_dirs: run directories holding ``metrics.jsonl``.
        out: the image to write (its suffix picks the format: .png, .svg, .pdf).

    Returns:
        ``out``.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise CharrnnError("plotting needs matplotlib: pip install 'charrnn[plot]'") from None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), dpi=dpi)
    for run_dir in run_dirs:
        records = runs.read_metrics(run_dir)
        if not (Path(run_dir) / runs.METRICS_FILE).exists():
            raise CharrnnError(f"{run_dir}: no {runs.METRICS_FILE}; is it a run directory?")
        label = Path(run_dir).name
        for kind, key, style in (("train", "loss", "-"), ("eval", "val_loss", "o-")):
            rows = [r for r in records if r.get("event") == kind and key in r]
            if not rows:
                continue
            bits = [r[key] / math.log(2) for r in rows]
            for ax, x in zip(axes, ("step", "chars")):
                ax.plot([r.get(x, 0) for r in rows], bits, style, markersize=3,
                        label=f"{label} {'train' if kind == 'train' else 'val'}", alpha=0.6 if kind == "train" else 1)
    for ax, xlabel in zip(axes, ("step", "characters seen")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss (bits/char)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(out)
    except (OSError, ValueError) as e:
        raise CharrnnError(f"cannot write {out}: {e}") from None
    finally:
        plt.close(fig)
    return Path(out)

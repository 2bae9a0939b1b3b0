"""Batches: the token stream laid out as parallel streams read in windows, for training and for
validation (host-side numpy, fixed shapes so each program compiles once)."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from charrnn.errors import CharrnnError
from charrnn.vocab import END, START


def split_train_val(stream: np.ndarray, val_frac: float) -> tuple[np.ndarray, np.ndarray]:
    """The last ``val_frac`` of the stream is validation, the rest training (as nanoGPT)."""
    n_val = int(len(stream) * val_frac)
    return stream[:len(stream) - n_val], stream[len(stream) - n_val:]


class StreamBatches:
    """The training stream laid out as ``batch_size`` parallel streams read in ``seq_len`` windows.

    Stream ``b`` is the ``b``-th contiguous slice of the text, so batch ``i + 1`` continues
    batch ``i`` in every row and the hidden state can be carried across batches. An epoch reads
    every stream once; the last ``< seq_len`` characters of each stream are not read as inputs.
    """

    def __init__(self, stream: np.ndarray, batch_size: int, seq_len: int):
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.stream_len, self.steps_per_epoch = self.layout(len(stream), batch_size, seq_len)
        used = batch_size * self.stream_len
        self.x_BxL = stream[:used].reshape(batch_size, self.stream_len)
        self.y_BxL = stream[1:used + 1].reshape(batch_size, self.stream_len)
        self.chars_per_step = batch_size * seq_len

    @staticmethod
    def layout(n: int, batch_size: int, seq_len: int) -> tuple[int, int]:
        """``(stream_len, steps_per_epoch)`` for ``n`` training tokens; refuses too small a text."""
        need = batch_size * seq_len + 1
        if n < need:
            raise CharrnnError(
                f"the training text is too small: {n} tokens, but one batch of --batch-size "
                f"{batch_size} x --seq-len {seq_len} needs {need}; lower --batch-size or --seq-len "
                f"(for example --batch-size {max(1, (n - 1) // max(1, min(seq_len, n - 1)))} "
                f"--seq-len {max(1, min(seq_len, n - 1))}) or use a larger corpus")
        stream_len = (n - 1) // batch_size
        return stream_len, stream_len // seq_len

    def position(self, step: int) -> tuple[int, int]:
        """``(epoch, window)`` read at global step ``step`` (0-based)."""
        return divmod(step, self.steps_per_epoch)

    def batch(self, step: int, rows: slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """Inputs and targets ``(x_BxT, y_BxT)`` for ``step``; ``rows`` selects this process's streams."""
        _, i = self.position(step)
        cols = slice(i * self.seq_len, (i + 1) * self.seq_len)
        return (np.asarray(self.x_BxL[rows, cols], dtype=np.int32),
                np.asarray(self.y_BxL[rows, cols], dtype=np.int32))

    def starts_epoch(self, step: int) -> bool:
        """True when ``step`` begins an epoch: the carried state is reset there (streams wrap)."""
        return self.position(step)[1] == 0


def eval_windows(stream: np.ndarray, num_streams: int, seq_len: int, chunk: int, warmup: int = 0
                 ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The whole of ``stream`` as padded windows for evaluation, built lazily.

    The stream is cut into ``num_streams`` contiguous rows, each read in ``seq_len`` windows,
    yielded ``chunk`` windows at a time as ``(x_KxBxT, y_KxBxT, weight_KxBxT)``. Every target
    except the start token (which follows an end token by construction) has weight 1 exactly
    once; padding has weight 0. Shapes are fixed so evaluation compiles once, and only one
    chunk is in memory at a time (the stream may be memory-mapped).

    With ``warmup`` each row first reads up to that many characters of the stream before its
    own part (the end of the previous row's part) with weight 0, so that the row's first
    targets are predicted from context, as in one reading of the whole stream, and not from an
    empty state: the loss then hardly depends on ``num_streams``.
    """
    n = len(stream) - 1
    if n <= 0:
        return
    row_len = -(-n // num_streams)
    rows = []  # (first input read, first scored input, end) of each non-empty row
    for b in range(num_streams):
        first, end = b * row_len, min((b + 1) * row_len, n)
        if end > first:
            rows.append((b, max(0, first - warmup), first, end))
    windows = -(-max(end - lo for _, lo, _, end in rows) // seq_len)
    span = chunk * seq_len
    for k in range(0, windows, chunk):
        x = np.full((num_streams, span), END, dtype=np.int32)
        y = np.full((num_streams, span), START, dtype=np.int32)
        w = np.zeros((num_streams, span), dtype=np.float32)
        for b, row_lo, first, end in rows:
            lo = row_lo + k * seq_len
            m = min(lo + span, end) - lo
            if m > 0:
                x[b, :m] = stream[lo:lo + m]
                y[b, :m] = stream[lo + 1:lo + m + 1]
                w[b, :m] = (y[b, :m] != START) & (np.arange(lo, lo + m) >= first)
        shape = (num_streams, chunk, seq_len)
        yield tuple(a.reshape(shape).transpose(1, 0, 2) for a in (x, y, w))

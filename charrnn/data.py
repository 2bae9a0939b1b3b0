"""Corpus reading, document splitting, the token stream, and its batch layouts (host-side numpy)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from charrnn import corpora
from charrnn.errors import CharrnnError
from charrnn.vocab import END, START, Vocab

log = logging.getLogger(__name__)

UTF8_BOM = b"\xef\xbb\xbf"
_PARAGRAPH_BREAK = re.compile(r"\r?\n(?:[ \t]*\r?\n)+")


@dataclass(frozen=True)
class Corpus:
    """A named corpus as a list of ``(source name, text)`` files, before document splitting."""

    name: str
    files: tuple[tuple[str, str], ...]

    @property
    def num_chars(self) -> int:
        return sum(len(t) for _, t in self.files)


def decode_bytes(raw: bytes, source: str, encoding: str = "utf-8") -> str:
    """Decode a corpus file, refusing binary data and invalid text with the byte offset.

    A UTF-8 byte-order mark is stripped; line endings are kept exactly as written.
    """
    if encoding.lower().replace("_", "-") in ("utf-8", "utf8") and raw.startswith(UTF8_BOM):
        raw = raw[len(UTF8_BOM):]
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        bad = raw[e.start:e.start + 1].hex()
        hint = " (a binary file?)" if b"\0" in raw[:8192] else ""
        raise CharrnnError(
            f"{source} is not valid {encoding}{hint}: byte 0x{bad} at offset {e.start}; "
            f"pass --encoding with the file's codec (for example --encoding latin-1)") from None
    if "\0" in text:
        raise CharrnnError(
            f"{source} looks binary: it contains a NUL character at offset {text.index(chr(0))}; "
            f"if it is UTF-16 text, pass --encoding utf-16")
    return text


def read_text_file(path: Path, encoding: str = "utf-8") -> str:
    """Read one corpus file as text (see ``decode_bytes``)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CharrnnError(f"cannot read {path}: {e.strerror or e}") from None
    return decode_bytes(raw, str(path), encoding)


def load_corpus(spec: str, encoding: str = "utf-8") -> Corpus:
    """Resolve ``spec`` to a corpus: a file, a directory (one file per document) or a corpus name.

    Args:
        spec: a path, or the name of a built-in or downloaded corpus (see ``charrnn.corpora``).
        encoding: codec of the corpus files.

    Returns:
        The corpus with its files' texts.
    """
    path = Path(spec).expanduser()
    if path.is_file():
        return Corpus(path.stem, ((str(path), read_text_file(path, encoding)),))
    if path.is_dir():
        files = []
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            if any(part.startswith(".") for part in f.relative_to(path).parts):
                continue
            try:
                raw = f.read_bytes()
            except OSError as e:
                raise CharrnnError(f"cannot read {f}: {e.strerror or e}") from None
            if b"\0" in raw[:8192] and encoding.lower().replace("_", "-") in ("utf-8", "utf8"):
                log.info("skipping binary file %s", f)
                continue
            files.append((str(f), decode_bytes(raw, str(f), encoding)))
        if not files:
            raise CharrnnError(f"directory {path} holds no text files")
        return Corpus(path.resolve().name, tuple(files))
    if path.exists():
        raise CharrnnError(f"{spec} is neither a file nor a directory")
    if spec in corpora.names():
        return Corpus(spec, tuple(corpora.load(spec)))
    known = ", ".join(corpora.names())
    raise CharrnnError(f"no such file, directory or corpus: {spec} (corpus names: {known})")


def split_documents(text: str, docs: str) -> list[str]:
    """Split one file's text into documents.

    ``file``: the whole text; ``line``: each non-empty line (its ``\\r\\n`` or ``\\n`` ending
    removed); ``paragraph``: blocks separated by blank lines. Empty documents are dropped.
    """
    if docs == "file":
        pieces = [text]
    elif docs == "line":
        pieces = [ln[:-1] if ln.endswith("\r") else ln for ln in text.split("\n")]
        pieces = [p for p in pieces if p.strip()]
    elif docs == "paragraph":
        pieces = [p.strip("\r\n") for p in _PARAGRAPH_BREAK.split(text)]
        pieces = [p for p in pieces if p.strip()]
    else:
        raise CharrnnError(f"--docs must be file, line or paragraph, not {docs!r}")
    return [p for p in pieces if p]


def corpus_documents(corpus: Corpus, docs: str) -> list[str]:
    """All documents of a corpus, in file order."""
    out: list[str] = []
    for _, text in corpus.files:
        out.extend(split_documents(text, docs))
    return out


def encode_documents(documents: Sequence[str], vocab: Vocab) -> np.ndarray:
    """The token stream: each document wrapped as ``START text END``, concatenated (int32)."""
    lengths = np.array([len(d) for d in documents], dtype=np.int64)
    ids = vocab.encode("".join(documents))
    n = len(documents)
    out = np.empty(int(lengths.sum()) + 2 * n, dtype=np.int32)
    starts = np.concatenate([[0], np.cumsum(lengths + 2)[:-1]]).astype(np.int64) if n else np.zeros(0, np.int64)
    ends = starts + lengths + 1
    is_text = np.ones(len(out), dtype=bool)
    is_text[starts] = False
    is_text[ends] = False
    out[starts] = START
    out[ends] = END
    out[is_text] = ids
    return out


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
        n = len(stream)
        need = batch_size * seq_len + 1
        if n < need:
            raise CharrnnError(
                f"the training text is too small: {n} tokens, but one batch of --batch-size "
                f"{batch_size} x --seq-len {seq_len} needs {need}; lower --batch-size or --seq-len "
                f"(for example --batch-size {max(1, (n - 1) // max(1, min(seq_len, n - 1)))} "
                f"--seq-len {max(1, min(seq_len, n - 1))}) or use a larger corpus")
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.stream_len = (n - 1) // batch_size
        self.steps_per_epoch = self.stream_len // seq_len
        used = batch_size * self.stream_len
        self.x_BxL = stream[:used].reshape(batch_size, self.stream_len)
        self.y_BxL = stream[1:used + 1].reshape(batch_size, self.stream_len)
        self.chars_per_step = batch_size * seq_len

    def position(self, step: int) -> tuple[int, int]:
        """``(epoch, window)`` read at global step ``step`` (0-based)."""
        return divmod(step, self.steps_per_epoch)

    def batch(self, step: int, rows: slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """Inputs and targets ``(x_BxT, y_BxT)`` for ``step``; ``rows`` selects this process's streams."""
        _, i = self.position(step)
        cols = slice(i * self.seq_len, (i + 1) * self.seq_len)
        return (np.ascontiguousarray(self.x_BxL[rows, cols]),
                np.ascontiguousarray(self.y_BxL[rows, cols]))

    def starts_epoch(self, step: int) -> bool:
        """True when ``step`` begins an epoch: the carried state is reset there (streams wrap)."""
        return self.position(step)[1] == 0


def eval_windows(stream: np.ndarray, num_streams: int, seq_len: int, chunk: int
                 ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The whole of ``stream`` as padded windows for evaluation.

    The stream is cut into ``num_streams`` contiguous rows, each read in ``seq_len`` windows,
    yielded ``chunk`` windows at a time as ``(x_KxBxT, y_KxBxT, weight_KxBxT)``. Every target
    except the start token (which follows an end token by construction) has weight 1 exactly
    once; padding has weight 0. Shapes are fixed so evaluation compiles once.
    """
    n = len(stream) - 1
    if n <= 0:
        return
    row_len = -(-n // num_streams)
    windows = -(-row_len // seq_len)
    windows = -(-windows // chunk) * chunk
    padded = num_streams * windows * seq_len
    x = np.full(padded, END, dtype=np.int32)
    y = np.full(padded, START, dtype=np.int32)
    w = np.zeros(padded, dtype=np.float32)
    # Row b holds positions [b*row_len, (b+1)*row_len) of the stream.
    idx = np.arange(num_streams * row_len).reshape(num_streams, row_len)
    valid = idx < n
    dest = (np.arange(num_streams)[:, None] * windows * seq_len + np.arange(row_len)[None, :])
    src = idx[valid]
    x[dest[valid]] = stream[src]
    y[dest[valid]] = stream[src + 1]
    w[dest[valid]] = (stream[src + 1] != START)
    shape = (num_streams, windows, seq_len)
    x, y, w = (a.reshape(shape).transpose(1, 0, 2) for a in (x, y, w))
    for k in range(0, windows, chunk):
        yield x[k:k + chunk], y[k:k + chunk], w[k:k + chunk]


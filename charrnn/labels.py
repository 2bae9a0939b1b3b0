"""Labelled corpora (one model, many styles): each document's label, read from ``--labels tsv``
or ``--labels dirs``; the label vocabulary a run keeps (``labels.json``); and the label id of
every token, a stream aligned with the token stream (``labels.npy``).

``tsv``: a file of ``label<TAB>text`` lines, one document each; the text has PostgreSQL
``COPY``'s escapes (``\\n``, ``\\t``, ``\\r``, ``\\\\``; a backslash before any other character
stands for that character), blank lines are skipped. ``dirs``: a directory with one
sub-directory per label; every text file under a label's directory is a document of that label
(or several, split by ``--docs``). Labelled corpora are read into memory (they are documents
with names, not a stream): the documents of every label are spread evenly over the token stream
(``interleave``), so the validation tail holds about ``val_frac`` of each label's documents
whatever order the file or the directories list them in.
"""

from __future__ import annotations

import json
import math
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from charrnn import data
from charrnn.errors import CharrnnError
from charrnn.vocab import START, json_record

LABELS_FILE = "labels.json"  # the label vocabulary, in the run directory
STREAM_FILE = "labels.npy"  # the label id of every token of tokens.npy, in the run directory
LABELS_FORMAT = 1
MAX_LABELS = 1 << 16  # label ids are stored as uint16 at most
_ESCAPE = re.compile(r"\\(.?)", re.DOTALL)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r"}
_COUNT_CHUNK = 1 << 24  # tokens scanned at a time when counting documents in a memory-mapped stream


def _known(names: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_name(name, where: str) -> None:
    """A label name is a non-empty string without control characters or surrounding spaces."""
    if not isinstance(name, str) or not name.strip():
        raise CharrnnError(f"{where}: empty label")
    if name != name.strip() or any(unicodedata.category(c) == "Cc" for c in name):
        raise CharrnnError(f"{where}: label {name!r} has control characters or surrounding spaces")


def stream_dtype(num_labels: int) -> np.dtype:
    """The smallest unsigned type of ``num_labels`` label ids: uint8, else uint16."""
    return np.dtype("<u1") if num_labels <= 256 else np.dtype("<u2")


@dataclass(frozen=True)
class LabelVocab:
    """The labels of a run: id ``i`` is ``names[i]`` (names sorted), and ``counts[i]`` documents of
    that label are in the training part of the stream (the proportions a sample draws from when
    it is not given a label).
    """

    names: tuple[str, ...]
    counts: tuple[int, ...]

    def __post_init__(self):
        if not self.names:
            raise CharrnnError("labels: a labelled run needs at least one label")
        if len(self.names) > MAX_LABELS:
            raise CharrnnError(f"labels: {len(self.names)} labels, at most {MAX_LABELS}")
        for name in self.names:
            check_name(name, "labels")
        if list(self.names) != sorted(set(self.names)):
            raise CharrnnError("labels: names must be sorted and unique")
        if len(self.counts) != len(self.names) or not all(
                isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in self.counts):
            raise CharrnnError("labels: one document count (an integer >= 0) per label")

    @property
    def size(self) -> int:
        return len(self.names)

    def proportions(self) -> np.ndarray:
        """Each label's share of the training documents (uniform if no document was counted)."""
        counts = np.asarray(self.counts, np.float64)
        total = counts.sum()
        return counts / total if total > 0 else np.full(self.size, 1.0 / self.size)

    @property
    def most_frequent(self) -> int:
        """The id of the label with the most training documents (the first of equals): what
        beam search, samples during training and the exported page use when no label is given."""
        return int(np.argmax(self.counts))

    def id(self, name: str) -> int:
        """The id of label ``name``; ``CharrnnError`` naming the known labels if there is none."""
        try:
            return self.names.index(name)
        except ValueError:
            raise CharrnnError(f"unknown label {name!r} (known: {_known(self.names)})") from None

    def weights(self, spec: str, field: str = "--label") -> np.ndarray:
        """The label mix ``spec`` asks for, as weights over the labels that sum to 1 (float32).

        ``spec``: a label's name (one-hot), or ``name=weight`` pairs separated by commas
        (``"a=0.7,b=0.3"``; weights >= 0, normalised). A name that is itself a label wins, so
        labels holding ``=`` or ``,`` can still be asked for alone. ``field``: what errors call
        the spec (the CLI's ``--label``, the server's ``label``).
        """
        if spec in self.names:
            w = np.zeros(self.size, np.float32)
            w[self.id(spec)] = 1.0
            return w
        w = np.zeros(self.size, np.float64)
        seen = set()
        for part in spec.split(","):
            name, eq, value = part.rpartition("=")
            if not eq:
                self.id(part.strip())  # raises: an unknown label
            name = name.strip()
            i = self.id(name)
            if name in seen:
                raise CharrnnError(f"{field} names {name!r} twice")
            seen.add(name)
            try:
                weight = float(value)
            except ValueError:
                weight = math.nan
            if not (math.isfinite(weight) and weight >= 0):
                raise CharrnnError(f"{field} weight of {name!r} must be a number >= 0, not {value.strip()!r}")
            w[i] = weight
        if w.sum() <= 0:
            raise CharrnnError(f"{field} {spec!r}: the weights must not all be 0")
        return (w / w.sum()).astype(np.float32)

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` label ids drawn in the training proportions (what a sample without a label uses)."""
        return rng.choice(self.size, size=n, p=self.proportions()).astype(np.int32)

    def to_json(self) -> str:
        return json.dumps({"format": LABELS_FORMAT,
                           "labels": [{"name": n, "documents": c} for n, c in zip(self.names, self.counts)]},
                          ensure_ascii=False, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "LabelVocab":
        """Parse ``labels.json``; ``CharrnnError`` naming the field when it is malformed."""
        d = json_record(text, "labels.json", LABELS_FORMAT)
        entries = d.get("labels")
        if not isinstance(entries, list) or not all(
                isinstance(e, dict) and set(e) == {"name", "documents"} for e in entries):
            raise CharrnnError("labels: field 'labels' must be a list of {\"name\", \"documents\"} objects")
        return cls(tuple(e["name"] for e in entries), tuple(e["documents"] for e in entries))


@dataclass(frozen=True)
class LabelledDocuments:
    """A labelled corpus in memory, in stream order: ``texts[k]`` is a document of label
    ``names[label_ids[k]]`` (``names``: the labels found, sorted)."""

    name: str
    names: tuple[str, ...]
    label_ids: np.ndarray
    texts: tuple[str, ...]

    def corpus(self) -> data.Corpus:
        """The documents as a corpus ``data.encode_corpus`` reads with ``docs="file"`` (one
        document per entry, in this order)."""
        return data.Corpus(self.name, tuple((f"{self.name}[{k}]", t) for k, t in enumerate(self.texts)))

    def token_counts(self) -> np.ndarray:
        """Tokens each document takes in the stream: its characters, the start and the end token."""
        return np.fromiter((len(t) + 2 for t in self.texts), np.int64, len(self.texts))

    def ids_in(self, vocab: LabelVocab, source: str = "") -> np.ndarray:
        """The documents' labels as ids of ``vocab`` (a run's labels, for text read later);
        ``CharrnnError`` naming a label the run does not know and the ones it does."""
        table = np.empty(len(self.names), np.int32)
        for i, n in enumerate(self.names):
            if n not in vocab.names:
                raise CharrnnError(f"{source or self.name}: unknown label {n!r} "
                                   f"(the run knows: {_known(vocab.names)})")
            table[i] = vocab.names.index(n)
        return table[self.label_ids]

    def stream(self, ids: Optional[np.ndarray] = None) -> np.ndarray:
        """The label id of every token of the documents' token stream (``START text END`` each):
        ``ids`` (default ``label_ids``) repeated over each document's tokens, uint8 or uint16."""
        ids = self.label_ids if ids is None else ids
        return np.repeat(ids.astype(stream_dtype(max(len(self.names), int(ids.max(initial=0)) + 1))),
                         self.token_counts())

    def vocab(self, train_tokens: int) -> LabelVocab:
        """The label vocabulary with the documents that start within the first ``train_tokens``
        tokens (the training part) counted per label."""
        starts = np.cumsum(self.token_counts()) - self.token_counts()
        counts = np.bincount(self.label_ids[starts < train_tokens], minlength=len(self.names))
        return LabelVocab(self.names, tuple(int(c) for c in counts))


def unescape(text: str, where: str) -> str:
    """PostgreSQL ``COPY``'s text escapes decoded: ``\\n``, ``\\t``, ``\\r``, ``\\\\``; a backslash
    before any other character is that character. A lone backslash at the end is an error."""
    if "\\" not in text:
        return text

    def one(m):
        c = m.group(1)
        if not c:
            raise CharrnnError(f"{where}: the text ends in a lone backslash (write \\\\ for one)")
        return _ESCAPES.get(c, c)

    return _ESCAPE.sub(one, text)


def read_tsv(path: Path, encoding: str = "utf-8") -> list[tuple[str, str]]:
    """``(label, text)`` of every non-blank ``label<TAB>text`` line of ``path``; a line without a
    tab, an empty label or a bad escape is a ``CharrnnError`` naming the file and line."""
    text = data.read_text_file(path, encoding)
    out = []
    for n, line in enumerate(text.split("\n"), 1):
        line = line[:-1] if line.endswith("\r") else line
        if not line.strip():
            continue
        where = f"{path}, line {n}"
        if "\t" not in line:
            raise CharrnnError(f"{where}: no tab; each line of a --labels tsv file is label<TAB>text")
        label, raw = line.split("\t", 1)
        check_name(label, where)
        out.append((label, unescape(raw, where)))
    return out


def read_dirs(path: Path, docs: str = "file", encoding: str = "utf-8") -> list[tuple[str, str]]:
    """``(label, text)`` of every document under ``path``'s label sub-directories (each split
    by ``docs``), label by label; a stray file beside them or a label without text is refused."""
    subdirs = []
    for entry in sorted(path.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            raise CharrnnError(f"{entry}: a --labels dirs directory holds one sub-directory per label "
                               "and no files beside them")
        subdirs.append(entry)
    if not subdirs:
        raise CharrnnError(f"{path}: no label sub-directories (--labels dirs: one per label)")
    out = []
    for sub in subdirs:
        check_name(sub.name, str(sub))
        try:
            documents = data.corpus_documents(data.load_corpus(str(sub), encoding), docs)
        except CharrnnError as e:
            if "holds no text files" in str(e):
                raise CharrnnError(f"label directory {sub} holds no text files") from None
            raise
        documents = [d for d in documents if d]
        if not documents:
            raise CharrnnError(f"label directory {sub} holds no text")
        out.extend((sub.name, d) for d in documents)
    return out


def interleave(label_ids: np.ndarray) -> np.ndarray:
    """An order of the documents that spreads each label's evenly over the stream, keeping each
    label's own order: the i-th of a label's n documents goes at (i + 1/2) / n."""
    counts = np.bincount(label_ids)
    rank = np.zeros(len(label_ids), np.float64)
    for label in np.flatnonzero(counts):
        where = np.flatnonzero(label_ids == label)
        rank[where] = (np.arange(len(where)) + 0.5) / len(where)
    return np.lexsort((label_ids, rank))


def read_labelled(spec: str, mode: str, docs: str = "file", encoding: str = "utf-8") -> LabelledDocuments:
    """A labelled corpus: ``mode`` ``tsv`` (``spec`` a file) or ``dirs`` (a directory); ``docs``
    splits the files of ``dirs`` (a tsv line is one document whatever ``docs``)."""
    path = Path(spec).expanduser()
    if mode == "tsv":
        if not path.is_file():
            raise CharrnnError(f"--labels tsv reads a file of label<TAB>text lines; {spec} is not a file")
        pairs = read_tsv(path, encoding)
    elif mode == "dirs":
        if not path.is_dir():
            raise CharrnnError(f"--labels dirs reads a directory of label sub-directories; {spec} is not a directory")
        pairs = read_dirs(path, docs, encoding)
    else:
        raise CharrnnError(f"--labels must be tsv or dirs to read labels, not {mode!r}")
    pairs = [(label, text) for label, text in pairs if text]
    if not pairs:
        raise CharrnnError(f"{spec} holds no labelled text")
    names = tuple(sorted({label for label, _ in pairs}))
    if len(names) > MAX_LABELS:
        raise CharrnnError(f"{spec}: {len(names)} labels, at most {MAX_LABELS}")
    index = {n: i for i, n in enumerate(names)}
    ids = np.array([index[label] for label, _ in pairs], np.int32)
    order = interleave(ids)
    return LabelledDocuments(path.stem if path.is_file() else path.resolve().name, names, ids[order],
                             tuple(pairs[k][1] for k in order))


def document_counts(tokens: np.ndarray, label_stream: np.ndarray, num_labels: int, end: int) -> np.ndarray:
    """Documents per label that start (a start token) before position ``end`` of a token stream
    and its label stream (memory-mapped ones are read in chunks)."""
    counts = np.zeros(num_labels, np.int64)
    for a in range(0, min(end, len(tokens)), _COUNT_CHUNK):
        b = min(a + _COUNT_CHUNK, end)
        starts = np.flatnonzero(np.asarray(tokens[a:b]) == START)
        counts += np.bincount(np.asarray(label_stream[a:b])[starts], minlength=num_labels)[:num_labels]
    return counts


def save_stream(path: Path, label_stream: np.ndarray) -> None:
    """Write a label stream as ``.npy`` (written aside, then renamed into place)."""
    from charrnn import checkpoint as ckpt  # only training writes it (and has JAX up)

    path = Path(path)
    tmp = path.with_name(f"{ckpt.TMP_PREFIX}{path.name}-{os.getpid()}")
    try:
        with ckpt.open_new(tmp) as f:
            np.save(f, np.ascontiguousarray(label_stream), allow_pickle=False)
        os.replace(tmp, path)
    except OSError as e:
        raise CharrnnError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)


def load_stream(path: Path, num_tokens: int, num_labels: int) -> np.ndarray:
    """A run's label stream, memory-mapped, checked against its token stream's length and its
    label count (``CharrnnError`` naming the file and what does not fit)."""
    try:
        stream = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise CharrnnError(f"{path}: missing (the label of every token of a labelled run)") from None
    except (OSError, ValueError) as e:
        raise CharrnnError(f"{path}: unreadable ({e})") from None
    if stream.ndim != 1 or stream.dtype not in (np.dtype("<u1"), np.dtype("<u2")):
        raise CharrnnError(f"{path}: expected a 1-D uint8 or uint16 array, found {stream.dtype} {stream.shape}")
    if len(stream) != num_tokens:
        raise CharrnnError(f"{path}: {len(stream)} labels for {num_tokens} tokens")
    for a in range(0, len(stream), _COUNT_CHUNK):
        top = int(np.max(stream[a:a + _COUNT_CHUNK]))
        if top >= num_labels:
            raise CharrnnError(f"{path}: label id {top} for a run of {num_labels} labels")
    return stream


# --- a run's labels ---------------------------------------------------------------------------

def labelled(config) -> bool:
    """Whether the run ``config`` (a ``RunConfig``) reads labelled text."""
    return config.data.labels != "none"


def write_vocab(run_dir: Path, vocab: LabelVocab) -> None:
    """Write ``labels.json`` into ``run_dir`` (written aside, then renamed into place)."""
    from charrnn import checkpoint as ckpt

    path = Path(run_dir) / LABELS_FILE
    tmp = path.with_name(f"{ckpt.TMP_PREFIX}{path.name}-{os.getpid()}")
    try:
        with ckpt.open_new(tmp, "wb") as f:
            f.write(vocab.to_json().encode("utf-8"))
        os.replace(tmp, path)
    except OSError as e:
        raise CharrnnError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)


def read_vocab(run_dir: Path, config) -> Optional[LabelVocab]:
    """The labels of the run in ``run_dir`` (None for an unlabelled run); ``CheckpointError``
    naming ``labels.json`` when it is missing or malformed."""
    from charrnn.errors import CheckpointError

    if not labelled(config):
        return None
    path = Path(run_dir) / LABELS_FILE
    try:
        return LabelVocab.from_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (the labels of a labelled run)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    except CharrnnError as e:
        raise CheckpointError(f"{path}: {e}") from None


def row_labels(vocab: Optional[LabelVocab], spec: Optional[str], rows: int, seed: Optional[int],
               field: str = "--label") -> tuple[Optional[np.ndarray], list[Optional[str]]]:
    """What each of ``rows`` samples is conditioned on: ``(label_weights_NxL, names)``.

    ``spec`` (``--label``): a label or a mix for every row; None on a labelled run draws one
    label per row in the training proportions (from ``seed``: the same seed, the same labels),
    named in ``names``. An unlabelled run takes no ``--label`` and gives ``(None, [None, ...])``.
    ``field``: what errors call ``spec`` (the server's is ``label``).
    """
    if vocab is None:
        if spec is not None:
            raise CharrnnError(f"{field}: this run was trained without labels")
        return None, [None] * rows
    if spec is not None:
        return np.tile(vocab.weights(spec, field), (rows, 1)), [spec] * rows
    rng = np.random.default_rng(None if seed is None else [seed & 0xFFFFFFFF, seed >> 32, 0x1abe1])
    ids = vocab.draw(rng, rows)
    return np.eye(vocab.size, dtype=np.float32)[ids], [vocab.names[i] for i in ids]

"""Corpus reading, document splitting, the token stream, and its batch layouts (host-side numpy)."""

from __future__ import annotations

import codecs
import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from charrnn import corpora
from charrnn.errors import CharrnnError
from charrnn.vocab import END, START, Vocab, code_points

log = logging.getLogger(__name__)

UTF8_BOM = b"\xef\xbb\xbf"
CHUNK_BYTES = 4 << 20  # corpus files are read and encoded this many bytes at a time
CHUNK_CHARS = 4 << 20
_PARAGRAPH_BREAK = re.compile(r"\r?\n(?:[ \t]*\r?\n)+")


@dataclass(frozen=True)
class Corpus:
    """A named corpus: ``(source name, content)`` files, where content is a path read lazily in
    chunks (so corpora larger than memory work) or a text already in memory."""

    name: str
    files: tuple[tuple[str, Union[str, Path]], ...]
    encoding: str = "utf-8"


def _is_utf8(encoding: str) -> bool:
    return encoding.lower().replace("_", "-") in ("utf-8", "utf8")


def _decode_error(source: str, encoding: str, offset: int, byte: bytes, binary: bool) -> CharrnnError:
    hint = " (a binary file?)" if binary else ""
    return CharrnnError(
        f"{source} is not valid {encoding}{hint}: byte 0x{byte.hex()} at offset {offset}; "
        f"pass --encoding with the file's codec (for example --encoding latin-1)")


def _nul_error(source: str, offset: int) -> CharrnnError:
    return CharrnnError(f"{source} looks binary: it contains a NUL character at offset {offset}; "
                        f"if it is UTF-16 text, pass --encoding utf-16")


def decode_bytes(raw: bytes, source: str, encoding: str = "utf-8") -> str:
    """Decode a corpus file, refusing binary data and invalid text with the byte offset.

    A UTF-8 byte-order mark is stripped; line endings are kept exactly as written.
    """
    return "".join(_decode_chunks([raw], source, encoding))


def _decode_chunks(blocks: Iterable[bytes], source: str, encoding: str) -> Iterator[str]:
    """Incrementally decode byte blocks (see ``decode_bytes``), reporting file-wide offsets."""
    decoder = codecs.getincrementaldecoder(encoding)("strict")
    offset = 0  # bytes consumed before this block
    chars = 0
    first = True
    blocks = iter(blocks)
    block = next(blocks, b"")
    while True:
        nxt = next(blocks, None)
        if first and _is_utf8(encoding) and block.startswith(UTF8_BOM):
            block = block[len(UTF8_BOM):]
            offset += len(UTF8_BOM)
        first = False
        try:
            text = decoder.decode(block, final=nxt is None)
        except UnicodeDecodeError as e:
            # e.start counts from the decoder's buffered bytes plus this block.
            pending = len(e.object) - len(block)
            at = offset - pending + e.start
            raise _decode_error(source, encoding, at, e.object[e.start:e.start + 1],
                                b"\0" in block[:8192]) from None
        if "\0" in text:
            raise _nul_error(source, chars + text.index("\0"))
        chars += len(text)
        offset += len(block)
        if text:
            yield text
        if nxt is None:
            return
        block = nxt


def _read_blocks(path: Path) -> Iterator[bytes]:
    try:
        with open(path, "rb") as f:
            while block := f.read(CHUNK_BYTES):
                yield block
    except OSError as e:
        raise CharrnnError(f"cannot read {path}: {e.strerror or e}") from None


def read_text_file(path: Path, encoding: str = "utf-8") -> str:
    """Read one corpus file as text (see ``decode_bytes``)."""
    return "".join(_decode_chunks(_read_blocks(Path(path)), str(path), encoding))


def load_corpus(spec: str, encoding: str = "utf-8") -> Corpus:
    """Resolve ``spec`` to a corpus: a file, a directory (one file per document) or a corpus name.

    Files are not read yet (``iter_pieces`` streams them), only listed; a directory's binary
    files are skipped.

    Args:
        spec: a path, or the name of a built-in or downloaded corpus (see ``charrnn.corpora``).
        encoding: codec of the corpus files.
    """
    path = Path(spec).expanduser()
    if path.is_file():
        return Corpus(path.stem, ((str(path), path),), encoding)
    if path.is_dir():
        files = []
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            if any(part.startswith(".") for part in f.relative_to(path).parts):
                continue
            try:
                with open(f, "rb") as fh:
                    head = fh.read(8192)
            except OSError as e:
                raise CharrnnError(f"cannot read {f}: {e.strerror or e}") from None
            if b"\0" in head and _is_utf8(encoding):
                log.info("skipping binary file %s", f)
                continue
            files.append((str(f), f))
        if not files:
            raise CharrnnError(f"directory {path} holds no text files")
        return Corpus(path.resolve().name, tuple(files), encoding)
    if path.exists():
        raise CharrnnError(f"{spec} is neither a file nor a directory")
    if spec in corpora.names():
        return Corpus(spec, tuple(corpora.load(spec)), encoding)
    known = ", ".join(corpora.names())
    raise CharrnnError(f"no such file, directory or corpus: {spec} (corpus names: {known})")


def _text_chunks(corpus: Corpus, content: Union[str, Path], label: str) -> Iterator[str]:
    if isinstance(content, str):
        for i in range(0, len(content), CHUNK_CHARS):
            yield content[i:i + CHUNK_CHARS]
    else:
        yield from _decode_chunks(_read_blocks(content), label, corpus.encoding)


def _clean(pieces: list[str], docs: str) -> list[str]:
    if docs == "line":
        pieces = [p[:-1] if p.endswith("\r") else p for p in pieces]
    elif docs == "paragraph":
        pieces = [p.strip("\r\n") for p in pieces]
    return [p for p in pieces if p.strip()]


def iter_pieces(corpus: Corpus, docs: str) -> Iterator[tuple[str, bool, bool]]:
    """Stream a corpus as ``(text, starts_document, ends_document)`` pieces, file by file.

    ``file``: each file is one document (streamed in chunks); ``line``: each non-empty line
    (its ``\\r\\n`` or ``\\n`` ending removed); ``paragraph``: blocks separated by blank lines.
    Empty documents are dropped.
    """
    if docs not in ("file", "line", "paragraph"):
        raise CharrnnError(f"--docs must be file, line or paragraph, not {docs!r}")
    for label, content in corpus.files:
        if docs == "file":
            prev = None
            for chunk in _text_chunks(corpus, content, label):
                if prev is not None:
                    yield prev
                prev = (chunk, prev is None, False)
            if prev is not None:
                yield prev[0], prev[1], True
            continue
        carry = ""
        for chunk in _text_chunks(corpus, content, label):
            text = chunk if not carry else carry + chunk
            parts = text.split("\n") if docs == "line" else _PARAGRAPH_BREAK.split(text)
            carry = parts.pop()
            if docs == "paragraph" and not carry and len(parts) > 0:
                # The text ends in a break that may go on in the next chunk: carry the break.
                carry = text[list(_PARAGRAPH_BREAK.finditer(text))[-1].start():]
            for p in _clean(parts, docs):
                yield p, True, True
        for p in _clean([carry], docs):
            yield p, True, True


def split_documents(text: str, docs: str) -> list[str]:
    """Split one text into documents (see ``iter_pieces``)."""
    return corpus_documents(Corpus("text", (("text", text),)), docs)


def corpus_documents(corpus: Corpus, docs: str) -> list[str]:
    """All documents of a corpus in memory, in file order (for small corpora and tests)."""
    out: list[str] = []
    current: list[str] = []
    for text, start, end in iter_pieces(corpus, docs):
        if start:
            current = []
        current.append(text)
        if end:
            out.append("".join(current))
    return out


def training_documents(corpus: Corpus, docs: str, val_frac: float) -> set[str]:
    """The documents wholly inside the training part of the corpus's token stream (the part
    before its last ``val_frac``, as ``batches.split_train_val`` cuts it): what a sample is
    novel against. A document the split cuts through is left out."""
    documents = corpus_documents(corpus, docs)
    stream_len = sum(len(d) + 2 for d in documents)  # START text END
    train_len = stream_len - int(stream_len * val_frac)
    out, pos = set(), 0
    for d in documents:
        pos += len(d) + 2
        if pos > train_len:
            break
        out.add(d)
    return out


@dataclass(frozen=True)
class EncodedCorpus:
    """A corpus as one token stream (in memory or memory-mapped) with its vocabulary."""

    stream: np.ndarray
    vocab: Vocab
    sha256: str


def corpus_vocab(corpus: Corpus, docs: str) -> tuple[Vocab, int]:
    """The vocabulary of every character in the corpus's documents and the length of its token
    stream, in one streaming pass."""
    seen = np.zeros(0x110000, dtype=bool)
    tokens = 0
    for text, start, end in iter_pieces(corpus, docs):
        seen[code_points(text)] = True
        tokens += len(text) + start + end
    if tokens == 0:
        raise CharrnnError(f"corpus {corpus.name} is empty: it has no "
                           + ("text" if docs == "file" else f"non-empty {docs}s"))
    return Vocab(tuple(chr(p) for p in np.flatnonzero(seen))), tokens


def encode_corpus(corpus: Corpus, docs: str, vocab: Vocab, out: Optional[Path] = None) -> EncodedCorpus:
    """Encode a corpus as a token stream, each document wrapped as ``START text END``.

    With ``out``, the ids are written in chunks to that ``.npy`` file (uint16 when the
    vocabulary fits) and returned memory-mapped, so the corpus never has to fit in memory;
    otherwise they are returned as an in-memory int32 array.
    """
    dtype = np.dtype("<u2") if vocab.size <= 0xFFFF else np.dtype("<i4")
    digest = hashlib.sha256()
    blocks: list[np.ndarray] = []
    tmp = None
    f = None
    if out is not None:
        from charrnn import checkpoint as ckpt  # only training writes the file (and has JAX up)

        # charrnn's temporary prefix, so the next start cleans them up and nothing else;
        # created exclusively, never through a symbolic link.
        tmp = out.with_name(f"{ckpt.TMP_PREFIX}{out.name}-{os.getpid()}")
        final_tmp = out.with_name(f"{ckpt.TMP_PREFIX}2-{out.name}-{os.getpid()}")
        try:
            f = ckpt.open_new(tmp)
        except OSError as e:
            raise CharrnnError(f"cannot write {out}: {e.strerror or e}") from None
    try:
        n = 0
        for text, start, end in iter_pieces(corpus, docs):
            ids = vocab.encode(text)
            if start or end:
                ids = np.concatenate([[START] if start else [], ids, [END] if end else []]).astype(np.int32)
            block = ids.astype(dtype)
            digest.update(block.tobytes())
            n += len(block)
            if f is not None:
                f.write(block.tobytes())
            else:
                blocks.append(block)
        if f is None:
            stream = np.concatenate(blocks).astype(np.int32) if blocks else np.zeros(0, np.int32)
            return EncodedCorpus(stream, vocab, digest.hexdigest())
        f.close()
        f = None
        # Prepend an .npy header by writing it into a second file and appending the body, cheaply:
        with ckpt.open_new(final_tmp) as g, open(tmp, "rb") as body:
            np.lib.format.write_array_header_1_0(g, {"descr": dtype.str, "fortran_order": False, "shape": (n,)})
            while block := body.read(CHUNK_BYTES):
                g.write(block)
        os.replace(final_tmp, out)
        stream = np.load(out, mmap_mode="r") if n else np.zeros(0, dtype)
        return EncodedCorpus(stream, vocab, digest.hexdigest())
    except OSError as e:
        raise CharrnnError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        if f is not None:
            f.close()
        if tmp is not None:
            tmp.unlink(missing_ok=True)
            final_tmp.unlink(missing_ok=True)


def encode_documents(documents: Sequence[str], vocab: Vocab) -> np.ndarray:
    """The token stream of in-memory documents: each wrapped as ``START text END`` (int32)."""
    pieces = Corpus("documents", tuple((f"doc{i}", d) for i, d in enumerate(documents)))
    return encode_corpus(pieces, "file", vocab).stream

"""Corpus decoding, document splitting, the token stream and its batch layouts."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from charrnn import data
from charrnn import data as data_mod
from charrnn.batches import StreamBatches, eval_windows, split_train_val
from charrnn.data import decode_bytes, encode_documents, split_documents
from charrnn.errors import CharrnnError
from charrnn.vocab import END, START, Vocab

# --- decoding ------------------------------------------------------------------------------


def test_bom_is_stripped_and_line_endings_kept():
    raw = b"\xef\xbb\xbfhello\r\nw\xc3\xb6rld\n"
    assert decode_bytes(raw, "x.txt") == "hello\r\nwörld\n"
    assert decode_bytes(raw, "x.txt", encoding="UTF_8") == "hello\r\nwörld\n"
    # A BOM in the middle is text, not a marker.
    assert decode_bytes(b"a\xef\xbb\xbfb", "x.txt") == "a\ufeffb"


def test_invalid_utf8_refused_with_byte_offset():
    with pytest.raises(CharrnnError) as e:
        decode_bytes("héllo".encode("utf-8") + b"\xff tail", "corpus.txt")
    msg = str(e.value)
    assert "corpus.txt" in msg and "byte 0xff at offset 6" in msg and "--encoding" in msg
    assert "binary" not in msg


def test_offset_is_the_file_offset_when_there_is_a_bom():
    # The user looks the byte up in the file, where the 3-byte BOM comes first.
    with pytest.raises(CharrnnError, match="byte 0xc3 at offset 4"):
        decode_bytes(b"\xef\xbb\xbfa\xc3", "x.txt")


def test_binary_refused():
    with pytest.raises(CharrnnError, match=r"looks binary: it contains a NUL character at offset 2"):
        decode_bytes(b"ab\x00cd", "b.bin")
    with pytest.raises(CharrnnError, match=r"b.bin is not valid utf-8 \(a binary file\?\): byte 0x89 at offset 0"):
        decode_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "b.bin")


def test_other_encodings():
    assert decode_bytes("café".encode("latin-1"), "x", "latin-1") == "café"
    # A UTF-16 file decoded as UTF-8 is refused (NUL bytes) with a hint at the right codec.
    with pytest.raises(CharrnnError, match="utf-16"):
        decode_bytes("abc".encode("utf-16-le"), "x")


def test_read_text_file_missing(tmp_path):
    with pytest.raises(CharrnnError, match="cannot read .*nope.txt"):
        data.read_text_file(tmp_path / "nope.txt")


def test_load_corpus_file_and_directory(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "d" / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "d" / ".hidden").write_text("hidden", encoding="utf-8")
    (tmp_path / "d" / "blob.bin").write_bytes(b"\x00\x01\x02")
    corp = data.load_corpus(str(tmp_path / "d"))
    assert corp.name == "d"
    assert data.corpus_documents(corp, "file") == ["first", "second"]  # sorted; hidden and binary skipped
    single = data.load_corpus(str(tmp_path / "d" / "a.txt"))
    assert single.name == "a" and data.corpus_documents(single, "file") == ["first"]
    with pytest.raises(CharrnnError, match="no such file, directory or corpus"):
        data.load_corpus(str(tmp_path / "missing.txt"))


def test_training_documents_are_those_wholly_before_the_validation_split():
    corp = data.Corpus("t", (("t", "aa\nbbb\ncccc\naa\n"),))  # streams of 4, 5, 6, 4 tokens: 19
    assert data.training_documents(corp, "line", 0.0) == {"aa", "bbb", "cccc"}
    assert data.training_documents(corp, "line", 0.4) == {"aa", "bbb"}  # the last 7 tokens validate
    assert data.training_documents(corp, "line", 0.6) == {"aa"}  # "bbb" straddles the split: left out
    assert data.training_documents(corp, "file", 0.1) == set()


# --- document splitting --------------------------------------------------------------------

CRLF_TEXT = "alpha\r\nbeta\r\n\r\n  \r\ngamma delta\r\nepsilon\r\n"


def test_file_mode_keeps_text_exactly():
    assert split_documents(CRLF_TEXT, "file") == [CRLF_TEXT]
    assert split_documents("", "file") == []


def test_line_mode_drops_line_endings_and_blank_lines():
    assert split_documents(CRLF_TEXT, "line") == ["alpha", "beta", "gamma delta", "epsilon"]
    assert split_documents("a\nb\n\nc", "line") == ["a", "b", "c"]
    # Only the line ending goes: a \r inside a line and leading spaces stay.
    assert split_documents("  x\ry\r\n", "line") == ["  x\ry"]


def test_paragraph_mode():
    assert split_documents(CRLF_TEXT, "paragraph") == ["alpha\r\nbeta", "gamma delta\r\nepsilon"]
    assert split_documents("p1 a\np1 b\n\n\n\np2\n \t \np3\n", "paragraph") == ["p1 a\np1 b", "p2", "p3"]
    assert split_documents("\n\n\n", "paragraph") == []


def test_unknown_doc_mode():
    with pytest.raises(CharrnnError, match="--docs"):
        split_documents("x", "sentence")


def _reference_split(text, docs):
    """The documented splitting rules, written out plainly."""
    if docs == "file":
        pieces = [text]
    elif docs == "line":
        pieces = [ln[:-1] if ln.endswith("\r") else ln for ln in text.split("\n")]
    else:
        pieces = [p.strip("\r\n") for p in re.split(r"\r?\n(?:[ \t]*\r?\n)+", text)]
    return [p for p in pieces if p.strip()] if docs != "file" else [p for p in pieces if p]


@pytest.mark.parametrize("docs, alphabet", [("file", "ab \t\r\n"), ("line", "ab \t\r\n"), ("paragraph", "ab\r\n")])
@given(data=st.data())
def test_chunked_splitting_matches_whole_text(monkeypatch, docs, alphabet, data):
    """Corpora are streamed in chunks; where the chunks end must not change the documents."""
    text = data.draw(st.text(alphabet=alphabet, max_size=60))
    chunk = data.draw(st.integers(1, 8))
    monkeypatch.setattr(data_mod, "CHUNK_CHARS", chunk, raising=False)
    assert split_documents(text, docs) == _reference_split(text, docs)


def test_paragraph_break_across_a_chunk_boundary(monkeypatch):
    text = "p1\n\n  \nq"
    assert split_documents(text, "paragraph") == ["p1", "q"]
    monkeypatch.setattr(data_mod, "CHUNK_CHARS", 4, raising=False)  # "p1\n\n" | "  \nq"
    assert split_documents(text, "paragraph") == ["p1", "q"]


def test_files_are_read_in_chunks(tmp_path, monkeypatch):
    raw = "\ufeffé漢\r\nline two\n\nlast 😀".encode("utf-8")
    path = tmp_path / "c.txt"
    path.write_bytes(raw)
    whole = data.read_text_file(path)
    assert whole == "é漢\r\nline two\n\nlast 😀"
    monkeypatch.setattr(data_mod, "CHUNK_BYTES", 3, raising=False)  # splits multi-byte characters
    assert data.read_text_file(path) == whole
    corp = data.load_corpus(str(path))
    assert data.corpus_documents(corp, "line") == ["é漢", "line two", "last 😀"]
    assert data.corpus_documents(corp, "file") == [whole]
    # Offsets stay file-wide when the bad byte is in a later chunk.
    path.write_bytes(b"abcdefg\xc3(")
    with pytest.raises(CharrnnError, match="byte 0xc3 at offset 7"):
        data.read_text_file(path)
    path.write_bytes("ééé\x00".encode("utf-8"))
    with pytest.raises(CharrnnError, match="NUL character at offset 3"):
        data.read_text_file(path)


def test_encode_corpus_to_a_file(tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("ab\nba\n\nc\n", encoding="utf-8")
    corp = data.load_corpus(str(path))
    vocab, num_tokens = data.corpus_vocab(corp, "line")
    assert vocab.chars == ("a", "b", "c") and num_tokens == 11
    in_memory = data.encode_corpus(corp, "line", vocab)
    on_disk = data.encode_corpus(corp, "line", vocab, tmp_path / "tokens.npy")
    assert in_memory.stream.tolist() == on_disk.stream.tolist() == [0, 2, 3, 1, 0, 3, 2, 1, 0, 4, 1]
    assert in_memory.sha256 == on_disk.sha256
    assert np.load(tmp_path / "tokens.npy").tolist() == in_memory.stream.tolist()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["names.txt", "tokens.npy"]  # no temporaries
    # A memory-mapped narrow-dtype stream still gives int32 batches.
    x, y = StreamBatches(on_disk.stream, 2, 2).batch(1)
    assert x.dtype == np.int32 and x.tolist() == [[3, 1], [1, 0]] and y.tolist() == [[1, 0], [0, 4]]
    with pytest.raises(CharrnnError, match="is empty: it has no non-empty lines"):
        data.corpus_vocab(data.Corpus("blank", (("blank", " \n\n"),)), "line")


def test_encode_documents_wraps_each_document():
    v = Vocab.from_texts(["abc"])
    a, b, c = v.encode("abc").tolist()
    out = encode_documents(["ab", "c", "cab"], v)
    assert out.dtype == np.int32
    assert out.tolist() == [START, a, b, END, START, c, END, START, c, a, b, END]
    assert encode_documents([], v).tolist() == []


@given(st.lists(st.text(alphabet="xyz\n", min_size=1, max_size=8), max_size=6))
def test_encode_documents_property(docs):
    v = Vocab.from_texts(docs)
    out = encode_documents(docs, v)
    expected = []
    for d in docs:
        expected += [START, *v.encode(d).tolist(), END]
    assert out.tolist() == expected


def test_split_train_val():
    s = np.arange(100, dtype=np.int32)
    tr, va = split_train_val(s, 0.1)
    assert tr.tolist() == list(range(90)) and va.tolist() == list(range(90, 100))
    tr, va = split_train_val(s, 0.0)
    assert len(tr) == 100 and len(va) == 0


# --- training batches ----------------------------------------------------------------------


def test_batches_continue_each_other():
    stream = np.arange(103, dtype=np.int32)
    b = StreamBatches(stream, batch_size=4, seq_len=5)
    assert (b.stream_len, b.steps_per_epoch, b.chars_per_step) == (25, 5, 20)
    for step in range(b.steps_per_epoch - 1):
        x0, y0 = b.batch(step)
        x1, y1 = b.batch(step + 1)
        assert x0.shape == y0.shape == (4, 5)
        # y is x shifted by one ...
        np.testing.assert_array_equal(y0[:, :-1], x0[:, 1:])
        # ... and the next batch starts where this one ended, in every row.
        np.testing.assert_array_equal(x1[:, 0], y0[:, -1])
        np.testing.assert_array_equal(x1[:, 0], x0[:, -1] + 1)
    x, y = b.batch(0)
    assert x[:, 0].tolist() == [0, 25, 50, 75]
    assert (y == x + 1).all()


def test_epochs_wrap():
    b = StreamBatches(np.arange(103, dtype=np.int32), batch_size=4, seq_len=5)
    assert b.position(0) == (0, 0) and b.position(7) == (1, 2)
    assert [b.starts_epoch(s) for s in range(11)] == [True, False, False, False, False, True,
                                                       False, False, False, False, True]
    for s in range(5):
        for a, c in zip(b.batch(s), b.batch(s + 5)):
            np.testing.assert_array_equal(a, c)


def test_row_selection():
    b = StreamBatches(np.arange(103, dtype=np.int32), batch_size=4, seq_len=5)
    x, y = b.batch(2, rows=slice(2, 4))
    full_x, full_y = b.batch(2)
    np.testing.assert_array_equal(x, full_x[2:4])
    np.testing.assert_array_equal(y, full_y[2:4])
    assert x.dtype == y.dtype == np.int32


def test_too_small_corpus_refused_with_numbers():
    with pytest.raises(CharrnnError) as e:
        StreamBatches(np.zeros(40, np.int32), batch_size=4, seq_len=10)
    msg = str(e.value)
    assert "40 tokens" in msg and "--batch-size 4 x --seq-len 10 needs 41" in msg
    # The suggestion it makes must itself be accepted.
    StreamBatches(np.zeros(40, np.int32), batch_size=3, seq_len=10)
    assert "--batch-size 3 --seq-len 10" in msg
    # Exactly one batch plus one target is enough.
    b = StreamBatches(np.zeros(41, np.int32), batch_size=4, seq_len=10)
    assert b.steps_per_epoch == 1


@given(st.integers(2, 200), st.integers(1, 64), st.integers(1, 64))
def test_too_small_suggestion_is_accepted(n, batch_size, seq_len):
    stream = np.zeros(n, np.int32)
    if n >= batch_size * seq_len + 1:
        StreamBatches(stream, batch_size, seq_len)
        return
    with pytest.raises(CharrnnError) as e:
        StreamBatches(stream, batch_size, seq_len)
    m = re.search(r"for example --batch-size (\d+) --seq-len (\d+)", str(e.value))
    assert m, str(e.value)
    b = StreamBatches(stream, int(m.group(1)), int(m.group(2)))
    assert b.steps_per_epoch >= 1


@given(st.integers(1, 300), st.integers(1, 6), st.integers(1, 9))
def test_one_epoch_covers_each_position_once(extra, batch_size, seq_len):
    n = batch_size * seq_len + extra
    stream = np.arange(n, dtype=np.int32)  # token value == stream position
    b = StreamBatches(stream, batch_size, seq_len)
    xs = np.stack([b.batch(s)[0] for s in range(b.steps_per_epoch)], axis=1)  # B x steps x T
    ys = np.stack([b.batch(s)[1] for s in range(b.steps_per_epoch)], axis=1)
    assert xs.shape == (batch_size, b.steps_per_epoch, seq_len)
    used = xs.reshape(-1)
    # Each input position is read once ...
    assert len(np.unique(used)) == used.size == batch_size * b.steps_per_epoch * seq_len
    np.testing.assert_array_equal(ys, xs + 1)
    # ... laid out as the streams: row b reads [b*L, b*L + steps*T) contiguously, in order ...
    L = b.stream_len
    for row in range(batch_size):
        np.testing.assert_array_equal(xs[row].reshape(-1), np.arange(row * L, row * L + b.steps_per_epoch * seq_len))
    # ... the streams are as long as possible, and each leaves fewer than seq_len unread.
    assert L == (n - 1) // batch_size
    assert 0 <= L - b.steps_per_epoch * seq_len < seq_len
    assert ys.max() <= n - 1


# --- evaluation windows --------------------------------------------------------------------


def _check_windows(stream, num_streams, seq_len, chunk, warmup=0):
    n = len(stream) - 1
    chunks = list(eval_windows(stream, num_streams, seq_len, chunk, warmup))
    if n <= 0:
        assert chunks == []
        return
    for x, y, w in chunks:
        assert x.shape == y.shape == w.shape == (chunk, num_streams, seq_len)
        assert x.dtype == y.dtype == np.int32 and w.dtype == np.float32
    x = np.concatenate([c[0] for c in chunks])  # windows x streams x T
    y = np.concatenate([c[1] for c in chunks])
    w = np.concatenate([c[2] for c in chunks])
    # Each row, its windows read in order, is one contiguous piece of the stream then padding:
    # up to `warmup` unscored characters before the row's own part, then that part, scored.
    rows_x = x.transpose(1, 0, 2).reshape(num_streams, -1)
    rows_y = y.transpose(1, 0, 2).reshape(num_streams, -1)
    rows_w = w.transpose(1, 0, 2).reshape(num_streams, -1)
    row_len = -(-n // num_streams)
    seen = np.zeros(n + 1, dtype=np.int64)
    for r in range(num_streams):
        own = np.arange(r * row_len, min((r + 1) * row_len, n))
        lead = np.arange(max(0, r * row_len - warmup), r * row_len) if len(own) else own[:0]
        pos = np.concatenate([lead, own])
        k, j = len(pos), len(lead)
        np.testing.assert_array_equal(rows_x[r, :k], stream[pos])
        np.testing.assert_array_equal(rows_y[r, :k], stream[pos + 1])
        assert (rows_w[r, :j] == 0).all()  # the warm-up is read, not scored
        np.testing.assert_array_equal(rows_w[r, j:k], (stream[own + 1] != START).astype(np.float32))
        assert (rows_w[r, k:] == 0).all()  # padding is never scored
        seen[own + 1] += 1
    # Every target appears exactly once; the scored ones are exactly the non-start targets.
    assert (seen[1:] == 1).all() and seen[0] == 0
    assert set(np.unique(w).tolist()) <= {0.0, 1.0}
    assert w.sum() == np.count_nonzero(stream[1:] != START)
    assert w[y == START].sum() == 0


def test_eval_windows_small_example():
    v = Vocab.from_texts(["abcde"])
    stream = encode_documents(["abc", "de", "e"], v)  # 12 tokens, 11 targets, 2 start targets
    chunks = list(eval_windows(stream, num_streams=2, seq_len=4, chunk=1))
    assert len(chunks) == 2
    x, y, w = chunks[0]
    assert x[0].tolist() == [stream[0:4].tolist(), stream[6:10].tolist()]
    assert w.sum() + chunks[1][2].sum() == 9
    _check_windows(stream, 2, 4, 1)


@given(st.lists(st.integers(0, 6), min_size=1, max_size=12), st.integers(1, 5), st.integers(1, 6),
       st.integers(1, 3), st.integers(0, 9))
def test_eval_windows_property(doc_lengths, num_streams, seq_len, chunk, warmup):
    docs = ["x" * n for n in doc_lengths]
    v = Vocab.from_texts(["x"])
    stream = encode_documents(docs, v)
    _check_windows(stream, num_streams, seq_len, chunk, warmup)


def test_eval_windows_warm_each_row_with_the_characters_before_it():
    stream = np.arange(2, 23, dtype=np.int32)  # 21 tokens, 20 targets, no start token among them
    x, y, w = (a.transpose(1, 0, 2).reshape(2, -1) for a in
               (np.concatenate(c) for c in zip(*eval_windows(stream, 2, 4, 1, warmup=3))))
    assert x[0, :10].tolist() == list(range(2, 12)) and w[0].tolist() == [1] * 10 + [0] * 6
    assert x[1, :13].tolist() == list(range(9, 22))  # three characters of row 0, then its own
    assert w[1].tolist() == [0] * 3 + [1] * 10 + [0] * 3


def test_eval_windows_tiny_streams():
    assert list(eval_windows(np.array([START], np.int32), 2, 3, 1)) == []
    _check_windows(np.array([START, END], np.int32), 3, 2, 2)


def test_shakespeare_stream(shakespeare_path):
    text = data.read_text_file(shakespeare_path)
    docs = split_documents(text, "file")
    v = Vocab.from_texts(docs)
    stream = encode_documents(docs, v)
    assert len(stream) == len(text) + 2
    assert v.decode(stream) == text
    b = StreamBatches(stream, 64, 16)
    assert b.steps_per_epoch == ((len(stream) - 1) // 64) // 16

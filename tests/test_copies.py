"""Copy detection (charrnn.copies): exact answers against brute force, the run-directory cache,
and the training split."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from charrnn import copies, data, runs
from charrnn.config import DataConfig, RunConfig
from charrnn.copies import Copy, CopyIndex
from charrnn.errors import CharrnnError
from charrnn.vocab import Vocab

# Extra characters widen the ids, which shrinks how many tokens a search key packs (q: 21, 7,
# 3), so the key range, the binary search and the key-block comparisons are all exercised.
EXTRA_CHARS = {"narrow": 0, "medium": 300, "wide": 70_000}


def vocab_for(alphabet: str, width: str) -> Vocab:
    return Vocab(tuple(alphabet) + tuple(chr(0x4E00 + i) for i in range(EXTRA_CHARS[width])))


def ids_of(text: str, vocab: Vocab) -> list[int]:
    """Ids with unknown characters as -1 (matching nothing), for the brute-force references."""
    known = {c: i + 2 for i, c in enumerate(vocab.chars)}
    return [known.get(c, -1) for c in text]


def brute_lengths(tokens: list[int], pattern: list[int]) -> list[int]:
    out = []
    for i in range(len(pattern)):
        best = 0
        for s in range(len(tokens)):
            k = 0
            while i + k < len(pattern) and s + k < len(tokens) and pattern[i + k] == tokens[s + k] >= 0:
                k += 1
            best = max(best, k)
        out.append(best)
    return out


def brute_count(tokens: list[int], pattern: list[int]) -> int:
    if not pattern or -1 in pattern:
        return 0
    return sum(tokens[s:s + len(pattern)] == pattern for s in range(len(tokens) - len(pattern) + 1))


def make_run(run_dir: Path, documents: list[str], val_frac: float, docs: str = "line",
             vocab: Vocab | None = None) -> Vocab:
    """A run directory as `charrnn train` leaves it (config, vocabulary, tokens.npy), untrained."""
    text = "\n".join(documents) + "\n"
    corpus = data.Corpus("tiny", (("tiny.txt", text),))
    vocab = vocab or data.corpus_vocab(corpus, docs)[0]
    runs.write_run_files(run_dir, RunConfig(data=DataConfig(docs=docs, val_frac=val_frac)), vocab)
    data.encode_corpus(corpus, docs, vocab, run_dir / runs.TOKENS_FILE)
    return vocab


# --- exact answers ------------------------------------------------------------------------------

documents_st = st.lists(st.text("abc", min_size=1, max_size=12), min_size=1, max_size=5)
sample_st = st.text("abcz?", max_size=40)  # z: in the vocabulary, never in the corpus; ?: unknown


@settings(max_examples=60)
@given(documents=documents_st, sample=sample_st, width=st.sampled_from(sorted(EXTRA_CHARS)))
def test_answers_match_brute_force(documents, sample, width):
    vocab = vocab_for("abcz", width)
    tokens = data.encode_documents(documents, vocab)
    index = CopyIndex(tokens, vocab)
    pattern = ids_of(sample, vocab)

    lengths = brute_lengths(tokens.tolist(), pattern)
    assert index.copy_lengths(sample).tolist() == lengths
    best = max(lengths, default=0)
    assert index.longest_copy(sample) == (Copy(lengths.index(best), best) if best else Copy(0, 0))
    for piece in (sample, sample[:3], sample[1:5], documents[0], documents[0][1:]):
        assert index.occurrences(piece) == brute_count(tokens.tolist(), ids_of(piece, vocab))
    for doc in (documents[0], documents[-1][:-1], sample):
        assert index.contains_document(doc) == (doc in documents)


@settings(max_examples=40)
@given(tokens=st.lists(st.integers(0, 3), max_size=60) | st.lists(st.integers(0, 600), max_size=30))
def test_suffix_array_is_the_sorted_suffixes(tokens):
    reference = sorted(range(len(tokens)), key=lambda i: tokens[i:])
    array = np.array(tokens, dtype=np.int32)
    assert copies.suffix_array(array).tolist() == reference
    assert copies._suffix_array_doubling(array).tolist() == reference


def test_without_pydivsufsort_the_numpy_build_is_used(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydivsufsort", None)  # makes `import pydivsufsort` fail
    tokens = np.array([2, 3, 2, 3, 2, 1, 0, 4], np.int32)
    assert copies.suffix_array(tokens).tolist() == sorted(range(8), key=lambda i: tokens[i:].tolist())


def test_long_copies_in_real_text(shakespeare_path):
    text = shakespeare_path.read_text(encoding="utf-8")[:200_000]
    vocab = Vocab.from_texts([text])
    index = CopyIndex(data.encode_documents([text], vocab), vocab)
    rng = np.random.default_rng(0)
    for _ in range(5):
        a, b = sorted(rng.integers(0, len(text) - 400, 2))
        piece_a, piece_b = text[a:a + 300], text[b:b + 120]
        sample = "~" + piece_b + "~" + piece_a + "~"  # ~ is not in the corpus
        found = index.longest_copy(sample)
        assert found.length >= 300 and sample[found.start:found.end] in text
        assert index.longest_copy(sample[found.start:found.end] + "~").length == found.length
        assert index.occurrences(piece_a) == text.count(piece_a) >= 1


def test_edge_cases():
    vocab = Vocab(tuple("ab"))
    empty = CopyIndex(np.zeros(0, np.uint16), vocab)
    assert empty.longest_copy("ab") == Copy(0, 0) and empty.occurrences("a") == 0
    assert not empty.contains_document("a")
    index = CopyIndex(data.encode_documents(["ab"], vocab), vocab)
    assert index.longest_copy("") == Copy(0, 0)
    assert index.longest_copy("x\U0001F600ab") == Copy(2, 2)  # code points past the vocabulary's
    assert index.occurrences("") == 0
    assert index.contains_document("ab") and not index.contains_document("")
    with pytest.raises(CharrnnError):
        CopyIndex(np.array([[0, 1]]), vocab)
    with pytest.raises(CharrnnError):
        CopyIndex(np.array([0, -1]), vocab)


# --- run directories: the training split and the cache ----------------------------------------

def test_only_the_training_part_is_indexed(tmp_path):
    documents = [f"name{i:02d}x" for i in range(18)] + ["valonly", "zzqzz"]
    make_run(tmp_path, documents, val_frac=0.09)
    tokens = np.load(tmp_path / runs.TOKENS_FILE)
    index = CopyIndex.for_run(tmp_path)
    assert len(tokens) == 178 and len(index) == 178 - int(178 * 0.09) == 18 * 9  # the last 2: validation
    assert index.contains_document("name00x") and index.contains_document("name17x")
    assert not index.contains_document("valonly") and not index.contains_document("name0")
    assert index.longest_copy("valonly").length < len("valonly")
    assert index.longest_copy("..name05x..") == Copy(2, 7)
    assert index.occurrences("name") == 18 and index.occurrences("zzqzz") == 0


def test_the_index_is_cached_and_reused(tmp_path, monkeypatch):
    make_run(tmp_path, ["alpha", "beta", "gamma"], val_frac=0.0)
    first = CopyIndex.for_run(tmp_path)
    cache = tmp_path / copies.INDEX_FILE
    assert cache.is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]

    def no_build(tokens):
        raise AssertionError("the suffix array was rebuilt")
    monkeypatch.setattr(copies, "suffix_array", no_build)
    second = CopyIndex.for_run(tmp_path)
    assert second.suffix_array.tolist() == first.suffix_array.tolist()
    assert second.longest_copy("xbetax") == Copy(1, 4)


def test_changed_tokens_rebuild_the_cache(tmp_path):
    vocab = make_run(tmp_path, ["alpha", "beta"], val_frac=0.0, vocab=Vocab(tuple("abeghlmpt")))
    assert CopyIndex.for_run(tmp_path).contains_document("beta")
    make_run(tmp_path, ["gamma", "them"], val_frac=0.0, vocab=vocab)  # same length, new tokens
    index = CopyIndex.for_run(tmp_path)
    assert index.contains_document("gamma") and not index.contains_document("beta")
    assert CopyIndex.for_run(tmp_path).contains_document("them")


def test_a_changed_val_frac_rebuilds_the_cache(tmp_path):
    make_run(tmp_path, ["one", "two", "six", "ten"], val_frac=0.0)
    assert CopyIndex.for_run(tmp_path).contains_document("ten")
    config, _ = runs.read_run_files(tmp_path)
    raw = json.loads(config.to_json())
    raw["data"]["val_frac"] = 0.25
    (tmp_path / runs.CONFIG_FILE).write_text(json.dumps(raw))
    index = CopyIndex.for_run(tmp_path)
    assert not index.contains_document("ten") and index.contains_document("six")


def _save_cache(path: Path, **arrays) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "not-a-permutation",
                                    "shuffled", "wrong-dtype", "bad-meta", "missing-meta"])
def test_a_damaged_cache_is_rebuilt(tmp_path, damage):
    make_run(tmp_path, ["abracadabra", "cadabra", "abba"], val_frac=0.0)
    good = CopyIndex.for_run(tmp_path)
    cache = tmp_path / copies.INDEX_FILE
    raw = cache.read_bytes()
    sa = good.suffix_array
    with np.load(cache) as z:
        meta = z["meta"]
    if damage == "truncated":
        cache.write_bytes(raw[:len(raw) // 2])
    elif damage == "garbage":
        cache.write_bytes(b"\x93NUMPY" + os.urandom(200))
    elif damage == "empty":
        cache.write_bytes(b"")
    elif damage == "not-a-permutation":
        _save_cache(cache, suffix_array=np.zeros_like(sa), meta=meta)
    elif damage == "shuffled":
        _save_cache(cache, suffix_array=sa[::-1].copy(), meta=meta)
    elif damage == "wrong-dtype":
        _save_cache(cache, suffix_array=sa.astype(np.float64), meta=meta)
    elif damage == "bad-meta":
        _save_cache(cache, suffix_array=sa, meta=np.frombuffer(b"{not json", np.uint8))
    elif damage == "missing-meta":
        _save_cache(cache, suffix_array=sa)
    index = CopyIndex.for_run(tmp_path)
    assert index.suffix_array.tolist() == sa.tolist()
    assert index.longest_copy("xcadabrax") == Copy(1, 7)
    with np.load(cache) as z:  # rewritten whole
        assert z["suffix_array"].tolist() == sa.tolist()


def test_an_unwritable_run_still_gets_an_index(tmp_path, monkeypatch):
    make_run(tmp_path, ["alpha", "beta"], val_frac=0.0)

    def disk_full(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(copies.os, "replace", disk_full)
    assert CopyIndex.for_run(tmp_path).contains_document("alpha")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "tokens.npy", "vocab.json"]


def test_bad_run_directories_are_refused(tmp_path):
    with pytest.raises(CharrnnError, match="no such run directory"):
        CopyIndex.for_run(tmp_path / "nope")
    make_run(tmp_path, ["alpha", "beta"], val_frac=0.0)
    tokens_file = tmp_path / runs.TOKENS_FILE
    tokens = np.load(tokens_file)
    tokens_file.unlink()
    with pytest.raises(CharrnnError, match="tokens.npy: missing"):
        CopyIndex.for_run(tmp_path)
    np.save(tokens_file, tokens.astype(np.int32) + 100)
    with pytest.raises(CharrnnError, match="outside the run's vocabulary"):
        CopyIndex.for_run(tmp_path)
    np.save(tokens_file, tokens.astype(np.float32))
    with pytest.raises(CharrnnError, match="1-D array of token ids"):
        CopyIndex.for_run(tmp_path)
    tokens_file.write_bytes(b"not an array")
    with pytest.raises(CharrnnError, match="not a readable token array"):
        CopyIndex.for_run(tmp_path)

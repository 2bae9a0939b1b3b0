"""The character vocabulary: ids, special tokens, Unicode, JSON, unknown characters."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from charrnn.errors import CharrnnError
from charrnn.vocab import END, NUM_SPECIAL, START, Vocab, describe_chars

# Emoji (with a zero-width-joiner family and a skin-tone modifier), a combining acute accent,
# CJK, Hangul, right-to-left script, and characters outside the Basic Multilingual Plane.
UNICODE_TEXT = "café e\u0301 👋🏽 👨\u200d👩\u200d👧 漢字かな 한국어 שלום 𝔘𝔫𝔦 \t\n"


def test_special_ids_and_size():
    v = Vocab.from_texts(["bca", "ab"])
    assert (START, END, NUM_SPECIAL) == (0, 1, 2)
    assert v.chars == ("a", "b", "c")
    assert v.size == 5
    assert v.encode("abc").tolist() == [2, 3, 4]
    assert v.encode("abc").dtype == np.int32


def test_round_trip_with_start_and_end_tokens():
    v = Vocab.from_texts(["hello world"])
    ids = [START, *v.encode("hello").tolist(), END, START, *v.encode("world").tolist(), END]
    assert v.decode(ids) == "helloworld"
    assert v.decode(ids, specials=True) == "⟨s⟩hello⟨/s⟩⟨s⟩world⟨/s⟩"
    assert v.decode(np.asarray(ids, dtype=np.int32)) == "helloworld"


def test_unicode_round_trip_is_per_code_point():
    v = Vocab.from_texts([UNICODE_TEXT])
    ids = v.encode(UNICODE_TEXT)
    assert len(ids) == len(UNICODE_TEXT)  # one id per code point, not per byte or grapheme
    assert v.decode(ids) == UNICODE_TEXT
    # The combining accent and the joiner are characters of their own.
    assert "\u0301" in v.chars and "\u200d" in v.chars and "👋" in v.chars and "🏽" in v.chars
    assert "漢" in v.chars and "𝔘" in v.chars
    assert ids.min() >= NUM_SPECIAL and ids.max() == v.size - 1
    # Sorted by code point, so the ids are too.
    assert list(v.chars) == sorted(set(UNICODE_TEXT), key=ord)


def test_json_round_trip():
    v = Vocab.from_texts([UNICODE_TEXT])
    text = v.to_json()
    d = json.loads(text)
    assert d["start_id"] == START and d["end_id"] == END and d["first_char_id"] == NUM_SPECIAL
    assert "漢" in text  # stored readably, not as \\u escapes
    w = Vocab.from_json(text)
    assert w == v
    assert w.encode(UNICODE_TEXT).tolist() == v.encode(UNICODE_TEXT).tolist()


@pytest.mark.parametrize("text, fragment", [
    ("not json", "not valid JSON"),
    ('{"format": 1, "start_id": 0, "end_id": 1, "first_char_id": 2}', "'chars'"),
    ('{"format": 2, "start_id": 0, "end_id": 1, "first_char_id": 2, "chars": ["a"]}', "'format'"),
    ('{"format": 1, "start_id": 1, "end_id": 0, "first_char_id": 2, "chars": ["a"]}', "special token"),
    ('{"format": 1, "start_id": 0, "end_id": 1, "first_char_id": 2, "chars": [1]}', "strings"),
    ('{"format": 1, "start_id": 0, "end_id": 1, "first_char_id": 2, "chars": ["a", "a"]}', "unique"),
    ('{"format": 1, "start_id": 0, "end_id": 1, "first_char_id": 2, "chars": ["ab"]}', "one character"),
])
def test_malformed_json_refused(text, fragment):
    with pytest.raises(CharrnnError, match=fragment):
        Vocab.from_json(text)


def test_extended_vocabulary_keeps_old_ids():
    v = Vocab.from_texts(["cab"])
    w = v.extended(["zebra", "cab", "é"])
    assert w.chars == ("a", "b", "c", "e", "r", "z", "é")
    for ch in "abc":
        assert w.encode(ch).tolist() == v.encode(ch).tolist()
    # Not sorted any more, and still a working, JSON-round-tripping vocabulary.
    u = Vocab(("c", "a", "é", "b"))
    assert u.encode("abcé").tolist() == [3, 5, 2, 4]
    assert u.decode(u.encode("éabc")) == "éabc"
    assert Vocab.from_json(u.to_json()) == u
    assert u.unknown("abz") == ["z"]


def test_unknown_characters_are_named():
    v = Vocab.from_texts(["abc"])
    with pytest.raises(CharrnnError) as e:
        v.encode("abxé😀x")
    msg = str(e.value)
    assert "'x' (U+0078)" in msg and "'é' (U+00E9)" in msg and "(U+1F600)" in msg
    assert "'a'" not in msg and "'b'" not in msg
    assert v.unknown("abxé😀x") == ["x", "é", "😀"]
    assert v.unknown("cab") == []


@pytest.mark.parametrize("text", ["\x00", "z", "\U0010ffff", "\n"])
def test_unknown_below_and_above_every_known_point(text):
    # Code points sorting before the first and after the last entry must not alias to them.
    v = Vocab.from_texts(["ab"])
    with pytest.raises(CharrnnError, match="not in the vocabulary"):
        v.encode(text)


def test_empty_vocabulary():
    v = Vocab.from_texts([])
    assert v.size == NUM_SPECIAL
    assert v.encode("").tolist() == []
    with pytest.raises(CharrnnError, match="U\\+0061"):
        v.encode("a")


def test_describe_chars_limits_the_list():
    chars = [chr(ord("a") + i) for i in range(25)]
    text = describe_chars(chars, limit=20)
    assert text.startswith("'a' (U+0061), 'b' (U+0062)")
    assert text.endswith("and 5 more")
    assert "'u'" not in text


unicode_text = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=200)


@given(unicode_text)
def test_round_trip_property(text):
    v = Vocab.from_texts([text])
    ids = v.encode(text)
    assert len(ids) == len(text)
    assert v.decode(ids) == text
    assert v.size == len(set(text)) + NUM_SPECIAL
    assert Vocab.from_json(v.to_json()) == v


@given(unicode_text, unicode_text)
def test_unknown_property(known, other):
    v = Vocab.from_texts([known])
    assert v.unknown(other) == sorted(set(other) - set(known), key=ord)
    if set(other) <= set(known):
        assert v.decode(v.encode(other)) == other
    else:
        with pytest.raises(CharrnnError, match="not in the vocabulary"):
            v.encode(other)

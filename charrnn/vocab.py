"""The character vocabulary: Unicode code points plus a start and an end token."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from charrnn.errors import CharrnnError

START = 0  # id of the start-of-document token
END = 1  # id of the end-of-document token
NUM_SPECIAL = 2
VOCAB_FORMAT = 1


def code_points(text: str) -> np.ndarray:
    """The code points of ``text`` as uint32 (UTF-32 gives one per character without a Python loop)."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


@dataclass(frozen=True)
class Vocab:
    """Characters; id 0 is the start token, id 1 the end token, id ``2 + i`` is ``chars[i]``.

    A vocabulary built from text is sorted; one extended for fine-tuning keeps the old ids and
    appends the new characters, so only uniqueness is required.
    """

    chars: tuple[str, ...]

    def __post_init__(self):
        if any(len(c) != 1 for c in self.chars):
            raise CharrnnError("vocabulary: every entry must be exactly one character")
        if len(set(self.chars)) != len(self.chars):
            raise CharrnnError("vocabulary: characters are not unique")
        points = np.array([ord(c) for c in self.chars], dtype=np.uint32)
        order = np.argsort(points, kind="stable")
        object.__setattr__(self, "_points", points[order])  # sorted, for searchsorted
        object.__setattr__(self, "_ids", (order + NUM_SPECIAL).astype(np.int32))
        # A code point -> id table (-1: unknown) makes encoding one gather, O(n).
        table = np.full(int(points.max()) + 2 if len(points) else 1, -1, dtype=np.int32)
        table[points] = np.arange(NUM_SPECIAL, NUM_SPECIAL + len(points), dtype=np.int32)
        object.__setattr__(self, "_table", table)

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> "Vocab":
        """The vocabulary of every character that occurs in ``texts``."""
        seen: set[int] = set()
        for t in texts:
            seen.update(np.unique(code_points(t)).tolist())
        return cls(tuple(chr(p) for p in sorted(seen)))

    @property
    def size(self) -> int:
        """Number of ids, special tokens included."""
        return len(self.chars) + NUM_SPECIAL

    def extended(self, texts: Iterable[str]) -> "Vocab":
        """This vocabulary with the new characters of ``texts`` appended (old ids unchanged)."""
        new = [c for c in Vocab.from_texts(texts).chars if c not in set(self.chars)]
        return Vocab(self.chars + tuple(new))

    def unknown(self, text: str) -> list[str]:
        """The distinct characters of ``text`` that are not in the vocabulary, sorted."""
        pts = np.unique(code_points(text))
        missing = pts[~np.isin(pts, self._points)]
        return [chr(p) for p in missing.tolist()]

    def encode(self, text: str) -> np.ndarray:
        """Ids of the characters of ``text`` (int32); raises ``CharrnnError`` naming unknown ones."""
        pts = code_points(text)
        table = self._table
        ids = table[np.minimum(pts, len(table) - 1)]
        if len(pts) and ((pts >= len(table)).any() or (ids < 0).any()):
            raise CharrnnError(f"characters not in the vocabulary: {describe_chars(self.unknown(text))}")
        return ids

    def decode(self, ids: Sequence[int], *, specials: bool = False) -> str:
        """Text of ``ids``; start/end tokens are dropped unless ``specials`` (then shown as ⟨s⟩/⟨/s⟩)."""
        out = []
        for i in ids:
            i = int(i)
            if i >= NUM_SPECIAL:
                out.append(self.chars[i - NUM_SPECIAL])
            elif specials:
                out.append("⟨s⟩" if i == START else "⟨/s⟩")
        return "".join(out)

    def to_json(self) -> str:
        return json.dumps({"format": VOCAB_FORMAT, "start_id": START, "end_id": END,
                           "first_char_id": NUM_SPECIAL, "chars": list(self.chars)},
                          ensure_ascii=False, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Vocab":
        """Parse ``vocab.json``; raises ``CharrnnError`` when it is malformed."""
        d = json_record(text, "vocabulary", VOCAB_FORMAT)
        if not isinstance(d.get("chars"), list):
            raise CharrnnError("vocabulary: field 'chars' must be a list")
        if (d.get("start_id"), d.get("end_id"), d.get("first_char_id")) != (START, END, NUM_SPECIAL):
            raise CharrnnError("vocabulary: special token ids do not match this version of charrnn")
        if not all(isinstance(c, str) for c in d["chars"]):
            raise CharrnnError("vocabulary: field 'chars' must hold strings")
        return cls(tuple(d["chars"]))


def json_record(text: str, what: str, version: int) -> dict:
    """A run file's JSON object (``vocab.json``, ``labels.json``) after checking its ``format``
    field is ``version``; ``CharrnnError`` naming ``what`` when it is not."""
    try:
        d = json.loads(text)
    except ValueError as e:
        raise CharrnnError(f"{what} is not valid JSON: {e}") from None
    got = d.get("format") if isinstance(d, dict) else None
    if got != version:
        raise CharrnnError(f"{what}: field 'format' is {got!r}, expected {version}")
    return d


def describe_chars(chars: Sequence[str], limit: int = 20) -> str:
    """A readable list of characters such as ``'é' (U+00E9), '\\n' (U+000A)``."""
    shown = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in chars[:limit])
    return shown + (f" and {len(chars) - limit} more" if len(chars) > limit else "")

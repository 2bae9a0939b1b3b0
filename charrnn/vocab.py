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


def _code_points(text: str) -> np.ndarray:
    # UTF-32 gives one uint32 per code point without a Python-level loop.
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

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> "Vocab":
        """The vocabulary of every character that occurs in ``texts``."""
        seen: set[int] = set()
        for t in texts:
            seen.update(np.unique(_code_points(t)).tolist())
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
        pts = np.unique(_code_points(text))
        missing = pts[~np.isin(pts, self._points)]
        return [chr(p) for p in missing.tolist()]

    def encode(self, text: str) -> np.ndarray:
        """Ids of the characters of ``text`` (int32); raises ``CharrnnError`` naming unknown ones."""
        pts = _code_points(text)
        idx = np.searchsorted(self._points, pts)
        idx = np.minimum(idx, max(len(self._points) - 1, 0))
        if len(self._points) == 0 and len(pts):
            ok = np.zeros(len(pts), dtype=bool)
        else:
            ok = self._points[idx] == pts if len(pts) else np.ones(0, dtype=bool)
        if not ok.all():
            missing = self.unknown(text)
            raise CharrnnError(f"characters not in the vocabulary: {describe_chars(missing)}")
        return self._ids[idx] if len(self._ids) else np.zeros(0, np.int32)

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
        try:
            d = json.loads(text)
        except ValueError as e:
            raise CharrnnError(f"vocabulary is not valid JSON: {e}") from None
        if not isinstance(d, dict) or not isinstance(d.get("chars"), list):
            raise CharrnnError("vocabulary: field 'chars' must be a list")
        if d.get("format") != VOCAB_FORMAT:
            raise CharrnnError(f"vocabulary: field 'format' is {d.get('format')!r}, expected {VOCAB_FORMAT}")
        if (d.get("start_id"), d.get("end_id"), d.get("first_char_id")) != (START, END, NUM_SPECIAL):
            raise CharrnnError("vocabulary: special token ids do not match this version of charrnn")
        if not all(isinstance(c, str) for c in d["chars"]):
            raise CharrnnError("vocabulary: field 'chars' must hold strings")
        return cls(tuple(d["chars"]))


def describe_chars(chars: Sequence[str], limit: int = 20) -> str:
    """A readable list of characters such as ``'é' (U+00E9), '\\n' (U+000A)``."""
    shown = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in chars[:limit])
    return shown + (f" and {len(chars) - limit} more" if len(chars) > limit else "")

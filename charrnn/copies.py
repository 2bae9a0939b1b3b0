"""Copy detection: a suffix-array index of a run's training tokens, and the longest span of a
text that occurs verbatim in them.

The suffix array (libdivsufsort through ``pydivsufsort``; numpy prefix doubling without it) is
built once per run and cached beside the run's ``tokens.npy`` as ``copies-index.npz``, keyed by
the SHA-256 and length of the training tokens, so a later check costs milliseconds. Lookups are
vectorised binary searches for every start position of the text at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from charrnn import data as data_mod
from charrnn import runs
from charrnn.errors import CharrnnError
from charrnn.vocab import END, NUM_SPECIAL, START, Vocab, code_points

log = logging.getLogger(__name__)

INDEX_FILE = "copies-index.npz"
INDEX_FORMAT = 1
_TMP_PREFIX = ".tmp-"  # as charrnn.checkpoint's temporaries, which resume cleans up
# Sentinels, all distinct from every token id (ids are >= 0) so they never count as a match.
# The text beyond the training tokens reads as _T_END: a suffix that ends sorts before any
# longer one, as in the suffix array's order.
_T_END = -1
_P_LOW = -2  # a pattern's end in a lower-bound search: the pattern sorts before its extensions
_P_HIGH = np.iinfo(np.int32).max  # ... in an upper-bound search: after them
_UNKNOWN = -3  # a character the vocabulary lacks: it matches nothing
_STRIDE = 8  # longest_copy searches every 8th start first
_MAX_BLOCKS = 32  # keys compared per row and round (doubling from 1 while rows tie)


@dataclass(frozen=True)
class Copy:
    """A span ``text[start:start + length]`` that occurs verbatim in the training text
    (``length`` 0: no character of the text does)."""

    start: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length


def suffix_array(tokens: np.ndarray) -> np.ndarray:
    """The suffix array of a 1-D array of non-negative token ids (int32, or int64 when large).

    libdivsufsort (``pydivsufsort``) builds it in linear time; without that package numpy
    prefix doubling gives the same array, more slowly.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError("suffix_array expects a 1-D array")
    if len(tokens) == 0:
        return np.zeros(0, np.int32)
    try:
        import pydivsufsort
    except ImportError:
        return _suffix_array_doubling(tokens)
    # A uint8 view of small ids is sorted directly; wider ids pydivsufsort sorts as big-endian bytes.
    narrow = tokens.astype(np.uint8) if int(tokens.max()) <= 0xFF else np.ascontiguousarray(tokens)
    return np.asarray(pydivsufsort.divsufsort(narrow))


def _suffix_array_doubling(tokens: np.ndarray) -> np.ndarray:
    """Prefix doubling (Manber–Myers with numpy sorts): O(n log n) per round, log(longest repeat) rounds."""
    n = len(tokens)
    index_dtype = np.int32 if n < 2**31 else np.int64
    if n == 0:
        return np.zeros(0, index_dtype)
    rank = np.unique(tokens, return_inverse=True)[1].astype(np.int64).reshape(-1)
    sa = np.argsort(rank, kind="stable")
    k = 1
    while True:
        second = np.full(n, -1, np.int64)
        second[:n - k] = rank[k:]
        key = rank * (n + 1) + (second + 1)  # ranks < n, so the pair packs into one int64
        sa = np.argsort(key, kind="stable")
        sorted_key = key[sa]
        new_rank = np.empty(n, np.int64)
        new_rank[sa] = np.concatenate([[0], np.cumsum(sorted_key[1:] != sorted_key[:-1])])
        rank = new_rank
        if rank[sa[-1]] == n - 1 or k >= n:
            return sa.astype(index_dtype)
        k *= 2


class CopyIndex:
    """A suffix-array index of a training token stream, answering which spans of a text it
    contains.

    Build one with ``CopyIndex.for_run(run_dir)`` (cached in the run directory) or
    ``CopyIndex(tokens, vocab)`` for tokens in memory. Read-only after construction.
    """

    def __init__(self, tokens: np.ndarray, vocab: Vocab, suffix_array_: Optional[np.ndarray] = None):
        """Args:
            tokens: the training token ids (1-D, START/END included), as in ``tokens.npy``.
            vocab: the vocabulary the ids belong to.
            suffix_array_: a suffix array of ``tokens`` already built (not checked); built if None.
        """
        self.tokens = np.asarray(tokens)
        if self.tokens.ndim != 1 or (self.tokens.size and self.tokens.dtype.kind not in "iu"):
            raise CharrnnError("the training tokens must be a 1-D array of token ids")
        if len(self.tokens) and int(self.tokens.min()) < 0:
            raise CharrnnError("the training tokens must be non-negative ids")
        self.vocab = vocab
        # Code point -> id (-1: not in the vocabulary; the last slot catches larger code points),
        # so unknown characters become a sentinel instead of an error.
        points = code_points("".join(vocab.chars)).astype(np.int64)
        self._table = np.full(int(points.max()) + 2 if len(points) else 1, -1, np.int32)
        self._table[points] = np.arange(len(points)) + NUM_SPECIAL
        self.suffix_array = suffix_array(self.tokens) if suffix_array_ is None else suffix_array_
        # Ids + 1 as base-2^bits digits (0: past the end, so a suffix that ends sorts first),
        # q to a key: the keys of the sorted suffixes are sorted too.
        top = max(vocab.size, int(self.tokens.max()) + 1 if len(self.tokens) else 0)
        self._bits = top.bit_length()
        self._q = max(1, 63 // self._bits)
        self._text_keys = _prefix_keys(self.tokens, self._bits, self._q)  # by position
        self._keys = self._text_keys[self.suffix_array]  # by suffix-array slot: sorted

    def __len__(self) -> int:
        return len(self.tokens)

    # --- building and caching -----------------------------------------------------------------

    @classmethod
    def for_run(cls, run_dir: Union[str, Path], cache: bool = True) -> "CopyIndex":
        """The index of a run's training tokens: the first ``len - int(len * val_frac)`` ids of
        its ``tokens.npy``.

        The suffix array is read from ``copies-index.npz`` in the run directory when that file
        was built from exactly these tokens (SHA-256 and length) and passes its checks;
        otherwise it is built and the file (re)written atomically. A run directory that cannot
        be written still gets an index, just not a cached one.

        Raises:
            CharrnnError: the run's config, vocabulary or tokens are missing or damaged.
        """
        run_dir = Path(run_dir)
        config, vocab = runs.read_run_files(run_dir)
        tokens = _read_tokens(run_dir, vocab)
        train = tokens[:len(tokens) - int(len(tokens) * config.data.val_frac)]
        digest = _digest(train)
        path = run_dir / INDEX_FILE
        sa = _read_cache(path, train, digest) if cache else None
        if sa is None:
            sa = suffix_array(train)
            if cache:
                _write_cache(path, sa, digest, len(train))
        return cls(train, vocab, sa)

    # --- queries --------------------------------------------------------------------------------

    def longest_copy(self, text: str) -> Copy:
        """The longest span of ``text`` that occurs verbatim in the training tokens.

        Ties go to the earliest span. Characters outside the vocabulary match nothing; spans
        never cross a document boundary of the training text (its START/END tokens).
        """
        pattern = self._encode(text)
        m = len(pattern)
        if m == 0 or len(self.tokens) == 0:
            return Copy(0, 0)
        # Search every _STRIDE-th start first (always the last one). A match from i leaves one
        # from i + 1 a token shorter, so the longest from i is at most (the longest from the next
        # searched start g) + (g - i): only the starts whose bound reaches the best found so far
        # can hold the longest copy, and only they are searched next.
        lengths = np.full(m, -1, np.int64)
        grid = np.arange(m - 1, -1, -_STRIDE)[::-1]
        lengths[grid] = self._bounds(pattern, grid, upper=False)[1]
        nxt = np.arange(m) + (m - 1 - np.arange(m)) % _STRIDE
        bound = lengths[nxt] + (nxt - np.arange(m))
        rest = np.flatnonzero((lengths < 0) & (bound >= lengths[grid].max()))
        if rest.size:
            lengths[rest] = self._bounds(pattern, rest, upper=False)[1]
        best = int(np.argmax(lengths))
        return Copy(best, int(lengths[best])) if lengths[best] > 0 else Copy(0, 0)

    def copy_lengths(self, text: str) -> np.ndarray:
        """For every position ``i`` of ``text``, the length of the longest prefix of ``text[i:]``
        that occurs in the training tokens (the text's matching statistics; int64 array)."""
        pattern = self._encode(text)
        if len(pattern) == 0 or len(self.tokens) == 0:
            return np.zeros(len(pattern), np.int64)
        return self._bounds(pattern, np.arange(len(pattern)), upper=False)[1]

    def occurrences(self, text: str) -> int:
        """How many times ``text`` occurs in the training tokens (overlaps counted; 0 for "")."""
        return self._count(self._encode(text))

    def contains_document(self, text: str) -> bool:
        """Whether ``text`` is one whole training document: START + text + END occurs (for
        line corpora, where a sample is a name or a line)."""
        pattern = self._encode(text)
        return self._count(np.concatenate([[START], pattern, [END]]).astype(np.int32)) > 0

    # --- the search -----------------------------------------------------------------------------

    def _encode(self, text: str) -> np.ndarray:
        points = code_points(text)
        ids = self._table[np.minimum(points, len(self._table) - 1)]
        return np.where(ids < 0, _UNKNOWN, ids).astype(np.int32)

    def _count(self, pattern: np.ndarray) -> int:
        if len(pattern) == 0 or len(self.tokens) == 0 or (pattern == _UNKNOWN).any():
            return 0
        start = np.zeros(1, np.int64)
        lo = self._bounds(pattern, start, upper=False)[0]
        hi = self._bounds(pattern, start, upper=True)[0]
        return int(hi[0] - lo[0])

    def _bounds(self, pattern: np.ndarray, starts: np.ndarray, upper: bool) -> tuple[np.ndarray, np.ndarray]:
        """Where each row ``pattern[s:]`` (``s`` in ``starts``) falls in the suffix array, and
        the longest prefix of the row that occurs in the tokens.

        Returns ``(slot, lcp)``: ``slot`` is the first suffix-array slot whose suffix is not
        smaller than the row (``upper``: greater than every extension of the row); ``lcp`` is
        the longest common prefix of the row with the suffixes beside that slot, which is the
        longest match of the row anywhere (suffixes sharing more lie next to each other).

        The first ``q`` tokens of every suffix are packed into one sorted uint64 key, so one
        ``searchsorted`` finds the slots of the suffixes sharing a row's first ``q`` tokens (or
        as many as it has before its end or an unknown character). Only rows that share all
        ``q`` with some suffix and go on are searched further, inside that range.
        """
        q, bits, n, m = self._q, self._bits, len(self.suffix_array), len(pattern)
        # The key of every position of the pattern (index m: past its end), holding j tokens:
        # up to q, stopped by the pattern's end or an unknown character.
        positions = np.arange(m + 1)
        bad = np.flatnonzero(pattern < 0)
        next_bad = np.full(m + 1, m, np.int64)
        next_bad[bad] = bad
        next_bad = np.minimum.accumulate(next_bad[::-1])[::-1]
        all_j = np.minimum(next_bad - positions, q)
        digit = np.arange(q)
        at = np.minimum(positions[:, None] + digit, m - 1)
        all_digits = np.where(digit < all_j[:, None], pattern[at].astype(np.int64) + 1, 0).astype(np.uint64)
        shifts = (bits * (q - 1 - digit)).astype(np.uint64)
        p_keys = (all_digits << shifts).sum(axis=1, dtype=np.uint64)
        p_full = all_j == q
        j, digits, key_lo = all_j[starts], all_digits[starts], p_keys[starts]
        key_hi = key_lo | ((np.uint64(1) << (bits * (q - j)).astype(np.uint64)) - np.uint64(1))
        # Sorted queries let searchsorted narrow each search from the one before.
        order = np.argsort(key_lo, kind="stable")
        first, last = np.empty_like(starts), np.empty_like(starts)
        first[order] = np.searchsorted(self._keys, key_lo[order], "left")
        last[order] = np.searchsorted(self._keys, key_hi[order], "right")

        slot = first.copy()
        lcp = np.zeros(len(starts), np.int64)
        found = (last > first) & (j > 0)
        # No suffix shares the row's key: its longest match is with a neighbour of the slot,
        # readable from their keys.
        missing = ~found & (j > 0)
        for side in (first - 1, first):
            ok = missing & (side >= 0) & (side < n)
            keys = self._keys[np.clip(side, 0, max(n - 1, 0))]
            equal = digits == ((keys[:, None] >> shifts) & np.uint64((1 << bits) - 1))
            lead = np.where(equal.all(axis=1), q, np.argmin(equal, axis=1))
            lcp = np.where(ok, np.maximum(lcp, np.minimum(lead, j)), lcp)
        # Rows that end (or meet an unknown character) within their key: the key range is exact.
        ended = starts + j == m
        settled = found & ((j < q) | ended)
        lcp[settled] = j[settled]
        if upper:
            slot[settled & ended] = last[settled & ended]
        # The rest share q tokens with the range and go on: binary search inside it.
        rest = np.flatnonzero(found & ~settled)
        if rest.size:
            slot[rest], lcp[rest] = self._search(pattern, p_keys, p_full, starts[rest], first[rest],
                                                 last[rest], _P_HIGH if upper else _P_LOW)
        return slot, lcp

    def _search(self, pattern: np.ndarray, p_keys: np.ndarray, p_full: np.ndarray, starts: np.ndarray,
                lo: np.ndarray, hi: np.ndarray, pad: int) -> tuple[np.ndarray, np.ndarray]:
        """Binary search of rows ``pattern[s:]`` (followed by ``pad``) inside slot ranges
        ``[lo, hi)`` whose suffixes all share the rows' first ``q`` tokens: the slot and the
        longest match.

        Every suffix between two that share ``k`` leading tokens with the row shares them too,
        so each comparison starts at the smaller LCP of the range's ends (Manber–Myers).
        """
        first, last = lo.copy(), hi.copy()
        lo, hi = lo.copy(), hi.copy()
        lcp_lo = np.full(len(starts), self._q, np.int64)  # the range's ends: at least q in common
        lcp_hi = lcp_lo.copy()
        active = np.arange(len(starts))
        while active.size:
            mid = (lo[active] + hi[active]) // 2
            skip = np.minimum(lcp_lo[active], lcp_hi[active])
            lcp, less = self._compare(pattern, p_keys, p_full, starts[active],
                                      self.suffix_array[mid].astype(np.int64), skip, pad)
            up, down = active[less], active[~less]  # up: the suffix at mid is smaller than the row
            lo[up] = mid[less] + 1
            lcp_lo[up] = lcp[less]
            hi[down] = mid[~less]
            lcp_hi[down] = lcp[~less]
            active = active[lo[active] < hi[active]]
        # A side moved from the range's end was compared exactly; an unmoved one is a suffix
        # outside the range, sharing fewer than q tokens, so never the longest.
        best = np.maximum(np.where(lo > first, lcp_lo, 0), np.where(hi < last, lcp_hi, 0))
        return lo, best

    def _compare(self, pattern: np.ndarray, p_keys: np.ndarray, p_full: np.ndarray,
                 p_start: np.ndarray, t_start: np.ndarray, skip: np.ndarray,
                 pad: int) -> tuple[np.ndarray, np.ndarray]:
        """The LCP of each row with its suffix, knowing the first ``skip`` tokens equal, and
        whether the suffix is smaller.

        Equal stretches are skipped ``q`` tokens per key (the text's keys against the
        pattern's, in blocks that double while rows tie, so a long copy costs O(log length)
        rounds); the block holding the first difference is then compared token by token.
        """
        q, m, n = self._q, len(pattern), len(self.tokens)
        lcp = skip.copy()
        todo = np.arange(len(p_start))
        width = 1
        while todo.size:
            k = lcp[todo, None] + q * np.arange(width)
            p_idx = np.minimum(p_start[todo, None] + k, m)  # index m: an all-zero, not-full key
            t_idx = t_start[todo, None] + k
            t_key = np.where(t_idx < n, self._text_keys[np.minimum(t_idx, n - 1)], np.uint64(0))
            same = (p_keys[p_idx] == t_key) & p_full[p_idx]
            tied = same.all(axis=1)
            done = todo[~tied]
            lcp[done] += q * np.argmin(same[~tied], axis=1)
            lcp[todo[tied]] += q * width
            todo = todo[tied]
            width = min(2 * width, _MAX_BLOCKS)
        # The first difference lies within q tokens of lcp now.
        k = lcp[:, None] + np.arange(q + 1)
        p_idx = p_start[:, None] + k
        t_idx = t_start[:, None] + k
        p_val = np.where(p_idx < m, pattern[np.minimum(p_idx, m - 1)], pad)
        t_val = np.where(t_idx < n, self.tokens[np.minimum(t_idx, n - 1)].astype(np.int32), _T_END)
        at = np.argmax(p_val != t_val, axis=1)
        rows = np.arange(len(p_start))
        return lcp + at, t_val[rows, at].astype(np.int64) < p_val[rows, at]


def _prefix_keys(tokens: np.ndarray, bits: int, q: int) -> np.ndarray:
    """The ``q`` tokens (+ 1, 0 past the end) from each position packed into a uint64, the
    first in the highest bits, so keys order as the token sequences do."""
    n = len(tokens)
    keys = np.zeros(n, np.uint64)
    for d in range(q):
        keys <<= np.uint64(bits)
        if d < n:
            keys[:n - d] |= tokens[d:].astype(np.uint64) + np.uint64(1)
    return keys


# --- run files ----------------------------------------------------------------------------------

def _read_tokens(run_dir: Path, vocab: Vocab) -> np.ndarray:
    """The run's ``tokens.npy`` (memory-mapped), checked to be ids of its vocabulary."""
    path = run_dir / runs.TOKENS_FILE
    if not path.exists():
        raise CharrnnError(f"{path}: missing (the run's encoded corpus, needed to check copies); "
                           f"training the run again writes it")
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise CharrnnError(f"{path}: not a readable token array ({e})") from None
    if tokens.ndim != 1 or tokens.dtype.kind not in "iu" or tokens.dtype.itemsize > 4:
        raise CharrnnError(f"{path}: expected a 1-D array of token ids, found {tokens.dtype} {tokens.shape}")
    tokens = np.asarray(tokens)  # a plain view of the map: fancy indexing without memmap overhead
    if len(tokens) and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab.size):
        raise CharrnnError(f"{path}: token ids outside the run's vocabulary of {vocab.size}")
    return tokens


def _digest(tokens: np.ndarray) -> str:
    """SHA-256 of the ids as little-endian int32, whatever dtype they are stored in."""
    h = hashlib.sha256()
    for i in range(0, len(tokens), data_mod.CHUNK_CHARS):
        h.update(np.ascontiguousarray(tokens[i:i + data_mod.CHUNK_CHARS], dtype="<i4").tobytes())
    return h.hexdigest()


def _read_cache(path: Path, tokens: np.ndarray, digest: str) -> Optional[np.ndarray]:
    """The cached suffix array if it was built from ``tokens`` and looks sound, else None."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode("utf-8"))
            sa = z["suffix_array"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, UnicodeDecodeError, EOFError) as e:
        log.info("%s: unreadable (%s); rebuilding", path, e)
        return None
    n = len(tokens)
    if not (isinstance(meta, dict) and meta.get("format") == INDEX_FORMAT
            and meta.get("tokens_sha256") == digest and meta.get("length") == n):
        log.info("%s: built from other tokens; rebuilding", path)
        return None
    if sa.shape != (n,) or sa.dtype not in (np.dtype("<i4"), np.dtype("<i8")):
        return None
    if n == 0:
        return sa
    # A permutation of 0..n-1 whose suffixes' first tokens are in order: not a proof of a
    # suffix array, but any damage to the file that still parses is very unlikely to pass.
    if sa.min() < 0 or sa.max() >= n or not (np.bincount(sa, minlength=n) == 1).all():
        return None
    first = tokens[sa]
    if (first[1:] < first[:-1]).any():
        return None
    return sa


def _write_cache(path: Path, sa: np.ndarray, digest: str, length: int) -> None:
    """Write the index atomically (temporary file, fsync, rename); a failure only costs the cache."""
    meta = json.dumps({"format": INDEX_FORMAT, "tokens_sha256": digest, "length": length})
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, suffix_array=sa, meta=np.frombuffer(meta.encode("utf-8"), np.uint8))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        log.info("%s: cannot cache the copy index (%s)", path, e)
        tmp.unlink(missing_ok=True)

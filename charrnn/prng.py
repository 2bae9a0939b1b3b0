"""Seeds to PRNG keys, on the host: every 64-bit seed its own key, and per-row keys of a batch.

``jax.random.PRNGKey(seed)`` keeps only the low 32 bits of a seed unless 64-bit mode is on, so
seeds 0 and 2**40 gave the same key. ``key_from_seed`` keeps both halves (and equals
``PRNGKey`` below 2**32, so existing seeds draw what they drew). ``fold_in`` is JAX's threefry
``fold_in`` written in numpy: building keys costs no compiled program before the first character.
"""

from __future__ import annotations

import numpy as np

from charrnn.errors import CharrnnError

SEED_LIMIT = 2 ** 64


def check_seed(seed, name: str = "--seed") -> int:
    """``seed`` as an int if it is an integer in ``[0, 2**64)``; ``CharrnnError`` naming the range otherwise."""
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise CharrnnError(f"{name} must be an integer in [0, 2**64), not {seed!r}")
    seed = int(seed)
    if not 0 <= seed < SEED_LIMIT:
        raise CharrnnError(f"{name} must be in [0, 2**64), not {seed}")
    return seed


def key_from_seed(seed) -> np.ndarray:
    """The threefry key ``uint32[2] = [seed >> 32, seed & 0xffffffff]`` of a seed in ``[0, 2**64)``.

    Equal to ``jax.random.PRNGKey(seed)`` for seeds below 2**32; distinct for all seeds.
    """
    seed = check_seed(seed)
    return np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32)


_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _rotl(x, d):
    return (x << np.uint32(d)) | (x >> np.uint32(32 - d))


def threefry2x32(key: np.ndarray, x0: np.ndarray, x1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The Threefry-2x32 block cipher (20 rounds) of words ``(x0, x1)`` under ``key``, as JAX computes it."""
    k0, k1 = np.uint32(key[0]), np.uint32(key[1])
    ks = (k0, k1, k0 ^ k1 ^ np.uint32(0x1BD11BDA))
    x0 = np.asarray(x0, np.uint32).copy()
    x1 = np.asarray(x1, np.uint32).copy()
    with np.errstate(over="ignore"):  # uint32 arithmetic wraps, as the cipher wants
        x0 += ks[0]
        x1 += ks[1]
        for i in range(5):
            for r in _ROTATIONS[i % 2]:
                x0 += x1
                x1 = _rotl(x1, r)
                x1 ^= x0
            x0 += ks[(i + 1) % 3]
            x1 += ks[(i + 2) % 3] + np.uint32(i + 1)
    return x0, x1


def fold_in(key: np.ndarray, data) -> np.ndarray:
    """``jax.random.fold_in(key, d)`` for each 32-bit ``d`` in ``data``: keys ``uint32[..., 2]``."""
    d = np.asarray(data, np.uint64).astype(np.uint32)
    y0, y1 = threefry2x32(np.asarray(key, np.uint32), np.zeros_like(d), d)
    return np.stack([y0, y1], axis=-1)


def row_keys(seed, rows: int, first: int = 0) -> np.ndarray:
    """Keys ``uint32[rows, 2]`` of rows ``first .. first + rows`` of a request seeded ``seed``:
    row ``i`` draws from ``fold_in(key_from_seed(seed), i)``, whatever batch it runs in."""
    return fold_in(key_from_seed(seed), np.arange(first, first + rows))

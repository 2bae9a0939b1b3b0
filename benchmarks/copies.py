"""Copy detection on tinyshakespeare: suffix-array build time and lookup latency.

Encodes the corpus as ``charrnn train`` does (one document, START ... END, uint16 ids in a run
directory's ``tokens.npy``), then times ``CopyIndex.for_run`` with no cache (build + write),
with its cache (read + check), the numpy fallback build (``--doubling``), and
``longest_copy`` on 200 random 500-character samples: half random characters of the
vocabulary, half spliced from the corpus (pieces of 20–200 characters from random places).

Run: ``python benchmarks/copies.py [CORPUS] [--samples 200] [--length 500] [--doubling]``
(CORPUS defaults to ``../shared/corpora/tinyshakespeare.txt`` beside the repository).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from charrnn import copies, data, runs  # noqa: E402
from charrnn.config import RunConfig  # noqa: E402


def make_run(corpus_path: Path, run_dir: Path) -> tuple[str, RunConfig]:
    """A run directory with the config, vocabulary and tokens ``charrnn train`` would write."""
    config = RunConfig(corpus=str(corpus_path))
    corpus = data.load_corpus(str(corpus_path))
    vocab, _ = data.corpus_vocab(corpus, config.data.docs)
    runs.write_run_files(run_dir, config, vocab)
    data.encode_corpus(corpus, config.data.docs, vocab, run_dir / runs.TOKENS_FILE)
    return data.read_text_file(corpus_path), config


def samples(text: str, chars: tuple[str, ...], count: int, length: int, rng) -> list[str]:
    out = []
    for i in range(count):
        if i % 2 == 0:
            out.append("".join(rng.choice(np.array(chars), length)))
            continue
        pieces, n = [], 0
        while n < length:
            size = int(rng.integers(20, 201))
            at = int(rng.integers(0, len(text) - size))
            pieces.append(text[at:at + size])
            n += size
        out.append("".join(pieces)[:length])
    return out


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("corpus", nargs="?", default=str(REPO.parent / "shared/corpora/tinyshakespeare.txt"))
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--length", type=int, default=500)
    ap.add_argument("--doubling", action="store_true", help="also time the numpy fallback build")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="charrnn-copies-bench-") as tmp:
        run_dir = Path(tmp)
        text, _ = make_run(Path(args.corpus), run_dir)
        cold, t_cold = timed(copies.CopyIndex.for_run, run_dir)
        _, t_warm = timed(copies.CopyIndex.for_run, run_dir)
        rows = [("training tokens", f"{len(cold):,}"),
                ("build (libdivsufsort) + cache write", f"{t_cold:.3f} s"),
                ("load from cache (hash + checks)", f"{t_warm:.3f} s")]
        if args.doubling:
            _, t_dbl = timed(copies._suffix_array_doubling, cold.tokens)
            rows.append(("build (numpy prefix doubling)", f"{t_dbl:.3f} s"))

        rng = np.random.default_rng(args.seed)
        batch = samples(text, cold.vocab.chars, args.samples, args.length, rng)
        cold.longest_copy(batch[0])  # first call: numpy's lazy imports
        for name, part in (("random", batch[0::2]), ("spliced", batch[1::2])):
            wall, cpu, lengths = [], [], []
            for s in part:
                c0 = time.thread_time()
                found, t = timed(cold.longest_copy, s)
                cpu.append((time.thread_time() - c0) * 1e3)
                wall.append(t * 1e3)
                lengths.append(found.length)
            (w50, w99), (c50, c99) = np.percentile(wall, [50, 99]), np.percentile(cpu, [50, 99])
            rows.append((f"longest_copy, {args.length}-char {name} (n={len(part)})",
                         f"wall p50 {w50:.2f} ms, p99 {w99:.2f} ms; CPU p50 {c50:.2f} ms, "
                         f"p99 {c99:.2f} ms; copy length median {int(np.median(lengths))}"))

    width = max(len(r[0]) for r in rows)
    # CPU time is the cost itself; wall time also counts waiting for a busy machine's cores.
    print(f"copy index on {Path(args.corpus).name} (load average {os.getloadavg()[0]:.1f})")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


if __name__ == "__main__":
    main()

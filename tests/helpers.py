"""Assertions several test modules share."""

from __future__ import annotations

import jax
import numpy as np


def assert_refused(result, *fragments):
    """A click ``CliRunner`` result that is the one-line error contract: a non-zero exit, exactly
    one ``charrnn: error:`` line on stderr holding every fragment, no traceback."""
    assert result.exit_code != 0, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("charrnn: error: "), lines[0]
    assert "Traceback" not in result.output
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def assert_matches_reference(got, want, got_grads, want_grads, dtype: str):
    """A backend's outputs and gradients against ``charrnn.cells``'s: float32 to the rounding of
    sums in another order, bfloat16 to that of bf16-rounded operands (gradients relative to
    their largest entry)."""
    atol = 2e-5 if dtype == "float32" else 3e-2
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=atol, rtol=0)
    grad_tol = 2e-4 if dtype == "float32" else 0.15
    for g, w in zip(jax.tree_util.tree_leaves(got_grads), jax.tree_util.tree_leaves(want_grads)):
        scale = max(1.0, float(np.abs(np.asarray(w)).max()))
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=grad_tol * scale, rtol=0)


def assert_steps_match(got_carry, got_logits, want_carry, want_logits):
    """Sampling steps against the reference's: logits to 3e-5, every carried state to 1e-5."""
    np.testing.assert_allclose(np.asarray(got_logits), np.asarray(want_logits), atol=3e-5, rtol=0)
    for g, w in zip(jax.tree_util.tree_leaves(got_carry), jax.tree_util.tree_leaves(want_carry)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=0)


def two_styles(path, docs: int = 40, seed: int = 0):
    """Write a ``--labels tsv`` corpus of two obvious kinds of document — ``upper``: upper-case
    letters only, ``digits``: digits only, alternating — and return its path."""
    rng = np.random.default_rng(seed)
    lines = []
    for k in range(docs):
        kind = "upper" if k % 2 else "digits"
        alphabet = "ABCDEFGHIJ" if kind == "upper" else "0123456789"
        lines.append(kind + "\t" + "".join(rng.choice(list(alphabet), rng.integers(20, 40))))
    path.write_text("\n".join(lines) + "\n")
    return path


def train_tiny(root, corpus, config, name: str = "tiny"):
    """Train ``config`` on ``corpus`` (a text, written to ``root/NAME.txt``, or a path) into
    ``root/NAME``; returns the run loaded at its latest checkpoint."""
    import charrnn

    if isinstance(corpus, str):
        path = root / f"{name}.txt"
        path.write_text(corpus, encoding="utf-8")
        corpus = path
    return charrnn.load(charrnn.train(str(corpus), config, out=str(root / name)).run_dir, "latest")

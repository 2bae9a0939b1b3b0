"""Beam search: the K most probable continuations of a primed row, on device.

Takes the sampler's ``step_fn(carry, token_B) -> (carry, logits_BxV)`` (``sample.model_step_fn``
for a model), so tests can drive it with fake logits. ``beam_search`` is ``Run.beam_search``'s
body: prime, search, rank, decode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from charrnn.errors import CharrnnError
from charrnn.sample import StepFn, loop_step, row_keys
from charrnn.vocab import END, START


@dataclass(frozen=True)
class BeamResult:
    """One beam-search continuation: text (prime included), total log-probability in nats, and
    whether it reached the end token."""

    text: str
    logprob: float
    ended: bool


class Beam(NamedTuple):
    """Beam search output: ``tokens_KxL`` (end tokens after a beam ends), total log-probabilities
    ``logprob_K`` (nats), ``length_K`` (tokens generated, the end token included) and ``ended_K``."""

    tokens_KxL: jax.Array
    logprob_K: jax.Array
    length_K: jax.Array
    ended_K: jax.Array


def make_beam_search(step_fn: StepFn, beam: int, length: int):
    """Build a jitted ``search(carry_1, logits_1xV) -> Beam`` keeping the ``beam`` most probable
    continuations (by total log-probability) for ``length`` steps from a primed single row.

    A beam that has drawn the end token continues only with end tokens at probability one, so
    finished and unfinished continuations compete on their total log-probability. With
    ``model_step_fn``'s step, ``carry_1`` is ``(params, state)`` and the weights are prepared
    once, outside the loop (see ``loop_step``); only the state is reordered.
    """

    @jax.jit
    def search(carry_1, logits_1xV):
        V = logits_1xV.shape[-1]
        step, inner_1, _ = loop_step(step_fn, carry_1, alone=True)
        carry = jax.tree_util.tree_map(lambda c: jnp.repeat(c, beam, axis=0), inner_1)
        logits = jnp.repeat(logits_1xV, beam, axis=0)
        # Only beam 0 is live at first, so the first expansion does not repeat itself.
        scores = jnp.full((beam,), -jnp.inf).at[0].set(0.0)
        tokens = jnp.full((beam, length), END, jnp.int32)
        done = jnp.zeros((beam,), bool)
        only_end_V = jnp.where(jnp.arange(V) == END, 0.0, -jnp.inf)

        def body(state, t):
            carry, logits, scores, tokens, done = state
            logp_KxV = jax.nn.log_softmax(logits.at[:, START].set(-jnp.inf), axis=-1)
            logp_KxV = jnp.where(done[:, None], only_end_V[None, :], logp_KxV)
            top, idx = jax.lax.top_k((scores[:, None] + logp_KxV).reshape(-1), beam)
            src, tok = idx // V, (idx % V).astype(jnp.int32)
            carry = jax.tree_util.tree_map(lambda c: c[src], carry)
            tokens = tokens[src].at[:, t].set(tok)
            done = done[src] | (tok == END)
            carry, logits = step(carry, tok)
            return (carry, logits, top, tokens, done), None

        (_, _, scores, tokens, done), _ = jax.lax.scan(
            body, (carry, logits, scores, tokens, done), jnp.arange(length))
        first_end = jnp.argmax(tokens == END, axis=-1)
        generated = jnp.where(done, first_end + 1, length)
        return Beam(tokens, scores, generated, done)

    return search


def rank_beams(beam: Beam, length_penalty: float = 0.0) -> list[int]:
    """Indices of the finite-scored beams, best first, by ``logprob / length ** length_penalty``."""
    logprob, n = np.asarray(beam.logprob_K), np.asarray(beam.length_K)
    score = logprob / np.maximum(n, 1) ** length_penalty
    order = [int(i) for i in np.argsort(-score, kind="stable") if np.isfinite(logprob[i])]
    return order


def check_search(beam: int, length: int) -> None:
    """``CharrnnError`` for a beam width or length below one (checked before anything is built)."""
    if beam < 1:
        raise CharrnnError(f"--beam must be at least 1, not {beam}")
    if length < 1:
        raise CharrnnError(f"--length must be at least 1, not {length}")


def beam_search(prime_fn, step_fn: StepFn, carry_1, prompt_1xP: np.ndarray, *, beam: int, length: int,
                length_penalty: float, decode: Callable[[np.ndarray], str], prime: str = "") -> list[BeamResult]:
    """The ``beam`` most probable continuations of one prompt, best first (``rank_beams``).

    Args:
        prime_fn: the sampler's ``prime`` (``sample.make_sampler``) for ``step_fn``.
        step_fn: ``sample.model_step_fn``'s step, its carry ``(params, state)``.
        carry_1: ``(params, state)`` of one row before the prompt.
        prompt_1xP: the start token and the prime's ids (``sample.prompt_tokens``).
        decode: token ids to text (``Vocab.decode``); ``prime`` is put before each text.
    """
    primed = prime_fn(carry_1, prompt_1xP, row_keys(0, 1))
    search = make_beam_search(step_fn, beam, length)
    result = jax.device_get(search((carry_1[0], primed.carry[1]), primed.logits_BxV))
    out = []
    for i in rank_beams(result, length_penalty):
        row = result.tokens_KxL[i][:int(result.length_K[i])]
        out.append(BeamResult(prime + decode(row), float(result.logprob_K[i]), bool(result.ended_K[i])))
    return out

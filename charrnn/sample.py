"""On-device sampling: prime by scanning the prompt, then a scanned loop feeding each output back.

Everything here takes a ``step_fn(carry, token_B) -> (carry, logits_BxV)`` callback, so tests
can drive the sampler with fake logits and check exact tokens.
"""

from __future__ import annotations

from typing import Callable, Iterator, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from charrnn import parallel
from charrnn.parallel import AXIS
from charrnn.vocab import END, START

StepFn = Callable  # (carry, token_B) -> (carry, logits_BxV)
CHUNK = 128  # characters generated per device dispatch; the CLI prints after each chunk


class Controls(NamedTuple):
    """Traced sampling controls (device scalars, so changing them does not recompile)."""

    temperature: jax.Array  # float32 > 0
    top_k: jax.Array  # int32 in [1, V]
    top_p: jax.Array  # float32 in (0, 1]
    greedy: jax.Array  # bool


def make_controls(vocab_size: int, temperature: float = 1.0, top_k=None, top_p=None, greedy=False) -> Controls:
    # numpy scalars, not jnp ones: each eager jnp conversion compiles a small XLA program of its
    # own (~10 ms apiece before the first character), and the jitted sampler takes either.
    return Controls(temperature=np.float32(temperature),
                    top_k=np.int32(min(top_k or vocab_size, vocab_size)),
                    top_p=np.float32(1.0 if top_p is None else top_p),
                    greedy=np.bool_(greedy))


def seed_key(seed: int):
    """``jax.random.PRNGKey(seed)``, built in numpy where that is exact (the default threefry
    key of a seed below 2**32 is ``[0, seed]``): the eager call compiles two small XLA programs
    before the first sampled character. Other seeds and key implementations go to JAX."""
    if jax.config.jax_default_prng_impl == "threefry2x32" and 0 <= seed < 2 ** 32:
        return np.array([0, seed], np.uint32)
    return jax.random.PRNGKey(seed)


def filter_logits(logits_BxV, controls: Controls):
    """Temperature, then top-k, then top-p (nucleus) filtering; removed entries become -inf.

    The start token is never a valid output. Ties at a threshold are all kept.
    """
    logits_BxV = logits_BxV.at[:, START].set(-jnp.inf) / controls.temperature
    # Sorting every row at every step is most of a small model's sampling step on CPU: skip it
    # unless top-k or top-p can remove something (without them it would remove nothing).
    active = (controls.top_k < logits_BxV.shape[-1]) | (controls.top_p < 1.0)
    return jax.lax.cond(active, _top_k_top_p, lambda logits, _: logits, logits_BxV, controls)


def _top_k_top_p(logits_BxV, controls: Controls):
    sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)
    kth_Bx1 = jax.lax.dynamic_slice_in_dim(sorted_BxV, controls.top_k - 1, 1, axis=-1)
    sorted_BxV = jnp.where(sorted_BxV < kth_Bx1, -jnp.inf, sorted_BxV)
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    # Keep the smallest prefix of the sorted distribution whose mass reaches top_p.
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    kept_BxV = (mass_before_BxV < controls.top_p) | (controls.top_p >= 1.0)
    cut_Bx1 = jnp.min(jnp.where(kept_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits_BxV < jnp.maximum(cut_Bx1, kth_Bx1), -jnp.inf, logits_BxV)


def gumbel_noise(key, steps: int, shape_BxV, rows=None):
    """Gumbel noise ``(steps, B, V)`` for ``steps`` draws of ``B`` rows at once (``pick`` adds it
    to the logits: ``jax.random.categorical``'s draw, written out).

    With ``rows = (first, total)`` — this block of rows is rows ``first ..`` of a batch of
    ``total`` split over devices — the noise of the whole batch is drawn and this block's rows
    kept, so every row draws exactly what it would on one device.
    """
    b, v = shape_BxV
    if rows is None:
        return jax.random.gumbel(key, (steps, b, v), jnp.float32)
    first, total = rows
    noise = jax.random.gumbel(key, (steps, total, v), jnp.float32)
    return jax.lax.dynamic_slice_in_dim(noise, first, b, axis=1)


def pick(logits_BxV, noise_BxV, controls: Controls):
    """The next token of every row: the argmax of the filtered logits plus ``gumbel_noise``'s
    noise (a draw from the filtered softmax), or of the filtered logits alone when greedy."""
    filtered = filter_logits(logits_BxV, controls)
    drawn = jnp.argmax(filtered + noise_BxV, axis=-1)
    best = jnp.argmax(filtered, axis=-1)
    return jnp.where(controls.greedy, best, drawn).astype(jnp.int32)


# Noise is drawn for up to this many bytes of steps at once (see ``noise_steps``).
NOISE_BYTES = 8 << 20


def noise_steps(chunk: int, rows: int, vocab_size: int, budget: Optional[int] = None) -> int:
    """How many steps of Gumbel noise ``generate`` draws at once: the largest power of two that
    divides ``chunk`` and keeps ``steps x rows x vocab_size`` float32 values within ``budget``.

    On CPU, JAX lowers its threefry hash as a rolled 5-iteration loop: drawn once per step,
    the noise (with the key split) cost ~70 small operations a step, more than a small
    model's whole step. Drawn for many steps at once it is one vectorised hash.
    """
    budget = NOISE_BYTES if budget is None else budget
    steps = 1
    while chunk % (2 * steps) == 0 and 2 * steps * rows * vocab_size * 4 <= budget:
        steps *= 2
    return steps


class SamplerState(NamedTuple):
    carry: tuple
    logits_BxV: jax.Array
    key: jax.Array
    done_B: jax.Array


def make_sampler(step_fn: StepFn, chunk: int = CHUNK, mesh: Optional[Mesh] = None):
    """Build the jitted pair ``(prime, generate)``.

    ``prime(carry, prompt_BxP, key) -> SamplerState`` feeds the prompt (start token first);
    ``generate(state, controls) -> (state, tokens_BxC)`` draws ``chunk`` tokens, feeding each
    back; a row that has drawn the end token emits only end tokens afterwards.

    With a ``mesh`` of several devices (a 1-D mesh over ``parallel.AXIS``) the rows are split
    over its devices, each running its own loop with no communication; ``carry`` must then be
    ``(params, state)`` as ``model_step_fn`` uses it (params replicated, state split by rows).
    The tokens are exactly those one device draws (see ``gumbel_noise``). On a 2-core CPU this
    samples a small model's batch of 32 ~1.3-1.8x as fast (see ``parallel.sampling_devices``).
    """
    split = mesh is not None and mesh.size > 1

    def prime(carry, prompt_BxP, key):
        step, inner, rebuild = _loop_step(step_fn, carry, alone=not split)
        inner, logits_PxBxV = jax.lax.scan(step, inner, prompt_BxP.T)
        done = jnp.zeros(prompt_BxP.shape[0], bool)
        return SamplerState(rebuild(inner), logits_PxBxV[-1], key, done)

    def generate(state: SamplerState, controls: Controls):
        b, v = state.logits_BxV.shape
        rows = None
        if split:  # this device's rows of the whole batch
            rows = (jax.lax.axis_index(AXIS) * b, b * mesh.size)
        step, inner, rebuild = _loop_step(step_fn, state.carry, alone=not split)
        steps = noise_steps(chunk, b * (mesh.size if split else 1), v)

        def body(s: SamplerState, noise_BxV):
            tok = pick(s.logits_BxV, noise_BxV, controls)
            tok = jnp.where(s.done_B, END, tok)
            carry, logits = step(s.carry, tok)
            return SamplerState(carry, logits, s.key, s.done_B | (tok == END)), tok

        def block(s: SamplerState, _):
            # The noise for ``steps`` steps at once, outside the per-step loop (see noise_steps).
            key, sub = jax.random.split(s.key)
            s, toks_SxB = jax.lax.scan(body, s._replace(key=key), gumbel_noise(sub, steps, (b, v), rows))
            return s, toks_SxB

        s, toks_NxSxB = jax.lax.scan(block, state._replace(carry=inner), None, length=chunk // steps)
        return s._replace(carry=rebuild(s.carry)), toks_NxSxB.reshape(chunk, b).T

    if not split:
        return jax.jit(prime), jax.jit(generate)
    by_rows = P(AXIS)
    carry_spec = (P(), by_rows)
    state_spec = SamplerState(carry_spec, by_rows, P(), by_rows)

    def placed(f, in_specs, out_specs):
        # check_vma=False: the native step kernel's custom calls (charrnn.step_kernel) carry no
        # varying-axes type; every device's loop is independent and the one replicated output,
        # the key, is split identically on every device.
        f = jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
        shardings = jax.tree_util.tree_map(lambda spec: NamedSharding(mesh, spec), in_specs,
                                           is_leaf=lambda x: isinstance(x, P))
        return jax.jit(f, in_shardings=shardings)

    return (placed(prime, (carry_spec, by_rows, P()), state_spec),
            placed(generate, (state_spec, P()), (state_spec, by_rows)))


def _loop_step(step_fn: StepFn, carry, alone: bool = False):
    """``(step, inner, rebuild)`` for a loop of ``step_fn`` calls starting from ``carry``.

    ``step(inner, token_B) -> (inner, logits_BxV)`` runs in the loop and ``rebuild(inner)`` is
    the carry again. For a plain ``step_fn`` that is ``step_fn`` over the whole carry. A
    ``step_fn`` with ``prepare`` and ``prepared`` attributes (``model_step_fn``) takes
    ``carry = (params, state)``: its parameters are prepared once here, outside the loop, and
    only ``state`` is carried through it (``prepare(params, alone, rows)``: ``alone``, this loop
    runs on one device with the machine's other cores idle, and ``prepare`` may spread a step
    over them; ``rows``, the batch a step runs).
    """
    prepare = getattr(step_fn, "prepare", None)
    if prepare is None:
        return step_fn, carry, lambda inner: inner
    params, state = carry
    weights = prepare(params, alone, jax.tree_util.tree_leaves(state)[0].shape[0])
    return (lambda inner, tok: step_fn.prepared(params, weights, inner, tok), state,
            lambda inner: (params, inner))


def generate_stream(prime, generate, carry, prompt_BxP: np.ndarray, key, controls: Controls, length: int
                    ) -> Iterator[np.ndarray]:
    """Yield new tokens ``(B, n)`` chunk by chunk until ``length`` or every row has ended."""
    state = prime(carry, np.asarray(prompt_BxP), key)
    made = 0
    while made < length:
        state, toks = generate(state, controls)
        toks = np.asarray(toks)[:, :length - made]
        made += toks.shape[1]
        yield toks
        if bool(np.all(toks == END)) or bool(jax.device_get(state.done_B).all()):
            break


def model_step_fn(graphdef, dtype=jnp.float32) -> StepFn:
    """A ``step_fn`` for a Flax model whose parameters ride in the carry as ``(params, state)``.

    The parameters are then an input of the compiled sampler, not constants baked into it, so
    one compilation serves every checkpoint of the same shapes (and a large model does not
    make a large program). The sampler's loops prepare them once per call (``prepare``:
    ``CharRNN.step_weights``, on ``parallel.sampling_threads`` threads where the sampler runs
    alone on one device) and run ``prepared`` inside; called directly, ``step_fn`` is
    ``CharRNN.step``.
    """

    def step_fn(carry, token_B):
        params, state = carry
        state, logits_BxV = nnx.merge(graphdef, params).step(state, token_B, dtype)
        return (params, state), logits_BxV

    def prepare(params, alone: bool = False, rows: int = 1):
        model = nnx.merge(graphdef, params)
        threads = 1
        if alone:  # the native step kernel may split a step over the idle cores
            c = model.config
            threads = parallel.sampling_threads(parallel.step_weight_bytes(c.cell, c.layers, c.hidden,
                                                                           model.vocab_size))
        return model.step_weights(dtype, threads, rows)

    def prepared(params, weights, state, token_B):
        # step_with reads only ``weights``; the merged module supplies the structure.
        return nnx.merge(graphdef, params).step_with(weights, state, token_B, dtype)

    step_fn.prepare = prepare
    step_fn.prepared = prepared
    return step_fn


def prompt_tokens(prime_ids: np.ndarray, num_samples: int) -> np.ndarray:
    """The prompt every sample starts from: the start token then the prime text, ``(N, 1 + P)``."""
    row = np.concatenate([[START], np.asarray(prime_ids, dtype=np.int32)]).astype(np.int32)
    return np.tile(row, (num_samples, 1))


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
    once, outside the loop (see ``_loop_step``); only the state is reordered.
    """

    @jax.jit
    def search(carry_1, logits_1xV):
        V = logits_1xV.shape[-1]
        step, inner_1, _ = _loop_step(step_fn, carry_1, alone=True)
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

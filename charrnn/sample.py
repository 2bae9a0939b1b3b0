"""On-device sampling: prime by scanning the prompt, then a scanned loop feeding each output back.

Everything here takes a ``step_fn(carry, token_B) -> (carry, logits_BxV)`` callback, so tests
can drive the sampler with fake logits and check exact tokens.

Every row is independent: its own PRNG key (``row_keys``), its own controls (temperature,
top-k, top-p, greedy, penalties: ``make_controls``) and, with penalties, its own character
counts kept on device. A row's tokens depend only on its key, prompt and controls — not on the
batch it runs in, its slot, the chunk size or the device split — so rows can join and leave a
running batch between chunks (``take_rows``, ``concat_rows``: the server's continuous batching).
"""

from __future__ import annotations

from typing import Callable, Iterator, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from charrnn import parallel, prng
from charrnn.parallel import AXIS
from charrnn.vocab import END, START

StepFn = Callable  # (carry, token_B) -> (carry, logits_BxV)
CHUNK = 128  # characters generated per device dispatch; the CLI prints after each chunk
# Each row's Gumbel noise comes in blocks of this many positions, block b from
# fold_in(row key, b): what a row draws never depends on how its chunks are cut.
NOISE_STEPS = 16


class Controls(NamedTuple):
    """Per-row sampling controls, ``(B,)`` arrays (numpy on the host; traced in the jitted
    sampler, so changing them does not recompile). Scalars are accepted and apply to every row.

    ``presence``/``frequency``: OpenAI's penalties (subtract ``presence`` from the logit of a
    character once it has appeared, and ``frequency`` times its count); ``repetition``: CTRL's
    (divide positive logits, multiply negative ones, of characters that appeared; 1 is off).
    They take effect only in a sampler built with ``penalties=True``.
    """

    temperature: jax.Array  # float32 > 0
    top_k: jax.Array  # int32 in [1, V]
    top_p: jax.Array  # float32 in (0, 1]
    greedy: jax.Array  # bool
    presence: jax.Array  # float32
    frequency: jax.Array  # float32
    repetition: jax.Array  # float32 > 0


def make_controls(vocab_size: int, temperature=1.0, top_k=None, top_p=None, greedy=False,
                  presence=0.0, frequency=0.0, repetition=1.0, *, rows: Optional[int] = None) -> Controls:
    """``Controls`` for ``rows`` rows (numpy arrays of shape ``(rows,)``).

    Each value is one setting for every row or a sequence with one per row (``None`` in
    ``top_k``/``top_p``, or as the whole value, means off). ``rows`` defaults to the length of
    the sequences given, else 1 (a ``(1,)`` control applies to every row of any batch).
    """
    values = dict(temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy, presence=presence,
                  frequency=frequency, repetition=repetition)
    lengths = {len(v) for v in values.values() if isinstance(v, (list, tuple, np.ndarray))}
    if rows is None:
        rows = lengths.pop() if len(lengths) == 1 else 1
    if lengths - {rows}:
        raise ValueError(f"per-row controls need {rows} values each, got lengths {sorted(lengths)}")

    def column(v, dtype, off=None):
        v = [off if x is None else x for x in v] if isinstance(v, (list, tuple)) else (off if v is None else v)
        return np.broadcast_to(np.asarray(v, dtype), (rows,)).copy()

    # numpy, not jnp: each eager jnp conversion compiles a small XLA program of its own (~10 ms
    # apiece before the first character), and the jitted sampler takes either.
    return Controls(temperature=column(temperature, np.float32),
                    top_k=np.clip(column(top_k, np.int64, vocab_size), 1, vocab_size).astype(np.int32),
                    top_p=column(top_p, np.float32, 1.0),
                    greedy=column(greedy, np.bool_),
                    presence=column(presence, np.float32),
                    frequency=column(frequency, np.float32),
                    repetition=column(repetition, np.float32))


def rows_controls(controls: Controls, rows: int) -> Controls:
    """``controls`` broadcast to ``(rows,)`` arrays (inside a jit: one program per row count)."""
    return Controls(*(jnp.broadcast_to(jnp.asarray(c), (rows,)) for c in controls))


def seed_key(seed: int):
    """The key of ``seed`` (``prng.key_from_seed``): ``jax.random.PRNGKey(seed)`` below 2**32,
    built in numpy (the eager call compiles two small XLA programs before the first character)."""
    return prng.key_from_seed(seed)


row_keys = prng.row_keys  # row_keys(seed, rows, first=0) -> uint32[rows, 2]


def penalize(logits_BxV, counts_BxV, controls: Controls):
    """The raw logits with each row's repetition (CTRL), presence and frequency (OpenAI)
    penalties for the characters it has counted; penalties of 0 (and repetition 1) leave them
    unchanged to the bit."""
    seen_BxV = counts_BxV > 0
    rep_Bx1 = controls.repetition[:, None]
    logits_BxV = jnp.where(seen_BxV, jnp.where(logits_BxV > 0, logits_BxV / rep_Bx1, logits_BxV * rep_Bx1),
                           logits_BxV)
    return (logits_BxV - controls.presence[:, None] * seen_BxV.astype(logits_BxV.dtype)
            - controls.frequency[:, None] * counts_BxV.astype(logits_BxV.dtype))


def filter_logits(logits_BxV, controls: Controls):
    """Temperature, then top-k, then top-p (nucleus) filtering, per row; removed entries become -inf.

    The temperature scales ``(logits - row max) / T`` and the start token (never a valid output)
    is masked after, so a tiny ``T`` acts as greedy and a huge finite one as uniform, never NaN.
    Ties at a threshold are all kept.
    """
    b, v = logits_BxV.shape
    controls = rows_controls(controls, b)
    is_start_1xV = (jnp.arange(v) == START)[None, :]
    max_Bx1 = jnp.max(jnp.where(is_start_1xV, -jnp.inf, logits_BxV), axis=-1, keepdims=True)
    max_Bx1 = jnp.where(jnp.isfinite(max_Bx1), max_Bx1, 0.0)  # a row of -inf stays -inf, not NaN
    # Clipped to float32's normal range: a denormal T may be flushed to 0 (0/0 is NaN), an
    # infinite one would turn -inf logits into NaN.
    t_Bx1 = jnp.clip(controls.temperature.astype(jnp.float32), np.finfo(np.float32).tiny,
                     np.finfo(np.float32).max)[:, None]
    logits_BxV = jnp.where(is_start_1xV, -jnp.inf, (logits_BxV - max_Bx1) / t_Bx1)
    # Sorting every row at every step is most of a small model's sampling step on CPU: skip it
    # unless some row's top-k or top-p can remove something (without them it would remove nothing).
    active = jnp.any(controls.top_k < v) | jnp.any(controls.top_p < 1.0)
    return jax.lax.cond(active, _top_k_top_p, lambda logits, _: logits, logits_BxV, controls)


def _top_k_top_p(logits_BxV, controls: Controls):
    v = logits_BxV.shape[-1]
    sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)
    k_Bx1 = jnp.clip(controls.top_k, 1, v)[:, None] - 1
    kth_Bx1 = jnp.take_along_axis(sorted_BxV, k_Bx1, axis=-1)
    sorted_BxV = jnp.where(sorted_BxV < kth_Bx1, -jnp.inf, sorted_BxV)
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    # Keep the smallest prefix of the sorted distribution whose mass reaches top_p.
    top_p_Bx1 = controls.top_p[:, None]
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    kept_BxV = (mass_before_BxV < top_p_Bx1) | (top_p_Bx1 >= 1.0)
    cut_Bx1 = jnp.min(jnp.where(kept_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits_BxV < jnp.maximum(cut_Bx1, kth_Bx1), -jnp.inf, logits_BxV)


def gumbel_noise(key, steps: int, shape_BxV, rows=None):
    """Gumbel noise ``(steps, B, V)`` from one key for ``steps`` draws of ``B`` rows (``pick``
    adds it to the logits: ``jax.random.categorical``'s draw, written out).

    With ``rows = (first, total)`` the noise of a batch of ``total`` rows is drawn and rows
    ``first ..`` kept. The sampler itself draws per row (``row_noise``); this is the one-key form.
    """
    b, v = shape_BxV
    if rows is None:
        return jax.random.gumbel(key, (steps, b, v), jnp.float32)
    first, total = rows
    noise = jax.random.gumbel(key, (steps, total, v), jnp.float32)
    return jax.lax.dynamic_slice_in_dim(noise, first, b, axis=1)


def row_noise(keys_Bx2, pos_B, blocks: int, vocab_size: int):
    """Gumbel noise ``(blocks * NOISE_STEPS, B, V)`` for the next ``blocks`` blocks of every row:
    block ``b`` of a row is ``gumbel(fold_in(row key, b), (NOISE_STEPS, V))``, ``b`` counted
    from the row's generated position ``pos_B`` (a multiple of ``NOISE_STEPS``)."""
    b = keys_Bx2.shape[0]
    block_BxN = (pos_B // NOISE_STEPS)[:, None] + jnp.arange(blocks, dtype=pos_B.dtype)[None, :]

    def block(key, index):
        return jax.random.gumbel(jax.random.fold_in(key, index), (NOISE_STEPS, vocab_size), jnp.float32)

    noise_BxNxSxV = jax.vmap(lambda key, idx: jax.vmap(lambda i: block(key, i))(idx))(keys_Bx2, block_BxN)
    return noise_BxNxSxV.transpose(1, 2, 0, 3).reshape(blocks * NOISE_STEPS, b, vocab_size)


def pick(logits_BxV, noise_BxV, controls: Controls):
    """The next token of every row: the argmax of the filtered logits plus Gumbel noise (a draw
    from the filtered softmax), or of the filtered logits alone for greedy rows."""
    filtered = filter_logits(logits_BxV, controls)
    drawn = jnp.argmax(filtered + noise_BxV, axis=-1)
    best = jnp.argmax(filtered, axis=-1)
    greedy_B = jnp.broadcast_to(jnp.asarray(controls.greedy), drawn.shape)
    return jnp.where(greedy_B, best, drawn).astype(jnp.int32)


# Noise is drawn for up to this many bytes of steps at once (see ``noise_steps``).
NOISE_BYTES = 8 << 20


def noise_steps(chunk: int, rows: int, vocab_size: int, budget: Optional[int] = None) -> int:
    """How many steps of Gumbel noise ``generate`` draws at once: the largest power of two that
    divides ``chunk`` and keeps ``steps x rows x vocab_size`` float32 values within ``budget``
    (the sampler takes at least ``NOISE_STEPS``, one block per row).

    On CPU, JAX lowers its threefry hash as a rolled 5-iteration loop: drawn once per step,
    the noise (with the key split) cost ~70 small operations a step, more than a small
    model's whole step. Drawn for many steps at once it is one vectorised hash.
    """
    budget = NOISE_BYTES if budget is None else budget
    steps = 1
    while chunk % (2 * steps) == 0 and 2 * steps * rows * vocab_size * 4 <= budget:
        steps *= 2
    return steps


class ModelCarry(NamedTuple):
    """The carry of a ``model_step_fn`` sampler: parameters (shared by all rows) and the
    per-row recurrent state. A tuple, so ``params, state = carry`` still reads it."""

    params: object
    state: object


class SamplerState(NamedTuple):
    """What the sampler carries between chunks, every field per row except ``carry``'s params.

    ``carry``: the step function's carry (``ModelCarry`` for ``model_step_fn``);
    ``logits_BxV``: the logits for each row's next token; ``key_Bx2``: each row's PRNG key;
    ``pos_B``: positions generated so far (noise block counter); ``done_B``: rows that have
    drawn the end token (they emit only end tokens); ``counts_BxV``: each row's character
    counts (int32; ``None`` in a sampler without penalties).
    """

    carry: object
    logits_BxV: jax.Array
    key_Bx2: jax.Array
    pos_B: jax.Array
    done_B: jax.Array
    counts_BxV: Optional[jax.Array] = None


def make_sampler(step_fn: StepFn, chunk: int = CHUNK, mesh: Optional[Mesh] = None, penalties: bool = False):
    """Build the pair ``(prime, generate)``.

    ``prime(carry, prompt_BxP, keys_Bx2, counts_BxV=None) -> SamplerState`` feeds the prompt;
    the carry is reset to zeros wherever a start token is read, so a prompt left-padded before
    its start token (``pad_prompts``) primes exactly the same state. ``keys_Bx2`` are the rows'
    keys (``row_keys``); one key ``(2,)`` means ``row_keys`` of it: row i gets ``fold_in(key, i)``.
    ``counts_BxV`` (penalties only): starting counts, e.g. ``prompt_counts`` for ``penalize_prime``;
    zeros when ``None``.

    ``generate(state, controls) -> (state, tokens_BxC)`` draws ``chunk`` tokens, feeding each
    back; a row whose done flag is set emits only end tokens. A chunk of whole noise blocks (a
    multiple of ``NOISE_STEPS``) draws its noise without gathers; any chunk draws the same tokens.

    ``penalties`` (static): count characters per row on device and apply ``Controls``'
    presence/frequency/repetition penalties; without it the program is exactly the plain one.

    With a ``mesh`` of several devices (a 1-D mesh over ``parallel.AXIS``) the rows are split
    over its devices, each running its own loop with no communication; ``carry`` must then be
    ``(params, state)`` as ``model_step_fn`` uses it (params replicated, state split by rows).
    Every row draws exactly what it draws on one device: its noise depends only on its key.
    """
    split = mesh is not None and mesh.size > 1
    model_carry = hasattr(step_fn, "prepare")

    def prime_rows(carry, prompt_BxP, keys_Bx2, counts_BxV):
        b = prompt_BxP.shape[0]
        step, inner, rebuild = loop_step(step_fn, carry, alone=not split)

        def body(inner, tok_B):
            return step(_reset_rows(step_fn, inner, tok_B == START), tok_B)

        inner, logits_PxBxV = jax.lax.scan(body, inner, prompt_BxP.T)
        logits_BxV = logits_PxBxV[-1]
        if penalties and counts_BxV is None:
            counts_BxV = jnp.zeros(logits_BxV.shape, jnp.int32)
        return SamplerState(rebuild(inner), logits_BxV, keys_Bx2, jnp.zeros(b, jnp.int32),
                            jnp.zeros(b, bool), counts_BxV if penalties else None)

    def generate_rows(state: SamplerState, controls: Controls):
        b, v = state.logits_BxV.shape
        controls = rows_controls(controls, b)
        step, inner, rebuild = loop_step(step_fn, state.carry, alone=not split)
        steps = max(NOISE_STEPS, noise_steps(chunk, b * (mesh.size if split else 1), v))

        def body(s: SamplerState, noise_BxV):
            logits = s.logits_BxV
            if penalties:
                logits = penalize(logits, s.counts_BxV, controls)
            tok = jnp.where(s.done_B, END, pick(logits, noise_BxV, controls))
            carry, logits = step(s.carry, tok)
            counts = s.counts_BxV + jax.nn.one_hot(tok, v, dtype=jnp.int32) if penalties else None
            return SamplerState(carry, logits, s.key_Bx2, s.pos_B + 1, s.done_B | (tok == END), counts), tok

        def group(s: SamplerState, _):
            # The noise for ``steps`` steps at once, outside the per-step loop (see noise_steps).
            return jax.lax.scan(body, s, row_noise(s.key_Bx2, s.pos_B, steps // NOISE_STEPS, v))

        def unaligned(s: SamplerState, _):
            # A chunk that is not whole blocks: draw the blocks it overlaps and take each row's
            # positions from them, so position p is still element p % 16 of block p // 16.
            blocks = (chunk + 2 * NOISE_STEPS - 2) // NOISE_STEPS
            noise_TxBxV = row_noise(s.key_Bx2, s.pos_B, blocks, v)
            noise_CxBxV = jax.vmap(lambda n, o: jax.lax.dynamic_slice_in_dim(n, o, chunk, axis=0),
                                   in_axes=(1, 0), out_axes=1)(noise_TxBxV, s.pos_B % NOISE_STEPS)
            return jax.lax.scan(body, s, noise_CxBxV)

        if chunk % NOISE_STEPS:
            group, steps = unaligned, chunk
        s, toks_NxSxB = jax.lax.scan(group, state._replace(carry=inner), None, length=chunk // steps)
        return s._replace(carry=rebuild(s.carry)), toks_NxSxB.reshape(chunk, b).T

    if not split:
        prime_jit, generate = jax.jit(prime_rows), jax.jit(generate_rows)
        prime_for = lambda with_counts: prime_jit  # noqa: E731
    else:
        by_rows = P(AXIS)
        carry_spec = ModelCarry(P(), by_rows)
        state_spec = SamplerState(carry_spec, by_rows, by_rows, by_rows, by_rows, by_rows if penalties else None)

        def placed(f, in_specs, out_specs, extra=None):
            # check_vma=False: the native step kernel's custom calls (charrnn.step_kernel) carry
            # no varying-axes type; every device's loop is independent.
            f = jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
            shardings = jax.tree_util.tree_map(lambda spec: NamedSharding(mesh, spec), in_specs,
                                               is_leaf=lambda x: isinstance(x, P))
            if extra is None:
                return jax.jit(f, in_shardings=shardings)
            return jax.jit(extra(f), in_shardings=shardings[:-1] + (NamedSharding(mesh, P()),))

        primes = {}

        def prime_for(with_counts: bool):
            if with_counts not in primes:
                counts_spec = by_rows if with_counts else None
                primes[with_counts] = placed(prime_rows, (carry_spec, by_rows, by_rows, counts_spec), state_spec)
            return primes[with_counts]

        def with_row_controls(f):  # controls arrive replicated, in any broadcastable shape
            return lambda state, controls: f(state, rows_controls(controls, state.logits_BxV.shape[0]))

        generate = placed(generate_rows, (state_spec, by_rows), (state_spec, by_rows), extra=with_row_controls)

    def prime(carry, prompt_BxP, keys_Bx2, counts_BxV=None):
        # On the host, before the jit: one program whatever form the carry, keys and counts come in.
        if model_carry:
            carry = ModelCarry(*carry)
        keys = _row_keys_of(keys_Bx2, prompt_BxP.shape[0])
        if not penalties:
            counts_BxV = None
        elif isinstance(counts_BxV, np.ndarray):
            counts_BxV = counts_BxV.astype(np.int32, copy=False)
        return prime_for(counts_BxV is not None)(carry, prompt_BxP, keys, counts_BxV)

    return prime, generate


def _row_keys_of(keys, rows: int):
    """``keys`` as per-row keys ``uint32[rows, 2]``: a single key ``(2,)`` gives ``fold_in(key, i)``."""
    if isinstance(keys, jax.Array) and jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key):
        keys = jax.random.key_data(keys)
    if getattr(keys, "shape", None) == (rows, 2):
        return keys
    key = np.asarray(keys, np.uint32)
    if key.shape != (2,):
        raise ValueError(f"keys must be one key (2,) or one per row ({rows}, 2), not {key.shape}")
    return prng.fold_in(key, np.arange(rows))


def _reset_rows(step_fn: StepFn, inner, reset_B):
    """``inner`` with the rows where ``reset_B`` is set put back to zeros (a start token read).

    Applies to ``model_step_fn``'s per-row state, and to a plain ``step_fn`` whose whole carry
    is per-row (``step_fn.row_carry = True``); other plain carries are left to the step_fn."""
    if hasattr(step_fn, "reset_rows"):  # a state with parts a start token keeps (a label term)
        return step_fn.reset_rows(inner, reset_B)
    if not (hasattr(step_fn, "prepare") or getattr(step_fn, "row_carry", False)):
        return inner
    return zero_rows(inner, reset_B)


def zero_rows(tree, reset_B):
    """Every leaf of ``tree`` with the rows where ``reset_B`` is set replaced by zeros."""

    def reset(x):
        mask = reset_B.reshape(reset_B.shape + (1,) * (x.ndim - 1))
        return jnp.where(mask, jnp.zeros_like(x), x)

    return jax.tree_util.tree_map(reset, tree)


def loop_step(step_fn: StepFn, carry, alone: bool = False):
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
            lambda inner: ModelCarry(params, inner))


def generate_stream(prime, generate, carry, prompt_BxP: np.ndarray, key, controls: Controls, length: int,
                    counts_BxV=None) -> Iterator[np.ndarray]:
    """Yield new tokens ``(B, n)`` chunk by chunk until ``length`` or every row has ended.

    ``key``: one key (row i draws from ``fold_in(key, i)``) or the rows' keys ``(B, 2)``.
    """
    state = prime(carry, prompt_BxP, key, counts_BxV)
    made = 0
    while made < length:
        state, toks = generate(state, controls)
        toks = np.asarray(toks)[:, :length - made]
        made += toks.shape[1]
        yield toks
        if bool(np.all(toks == END)) or bool(jax.device_get(state.done_B).all()):
            break


def _take(tree, idx):
    return jax.tree_util.tree_map(lambda a: a[idx], tree)


def take_rows(x, idx):
    """Rows ``idx`` (indices or a boolean mask) of a ``SamplerState``, ``Controls`` or any
    per-row pytree; a ``ModelCarry``'s params are kept whole. Traceable: jit it with fixed sizes."""
    idx = np.asarray(idx) if isinstance(idx, (list, tuple)) else idx
    if isinstance(x, SamplerState):
        carry = x.carry
        carry = ModelCarry(carry.params, _take(carry.state, idx)) if isinstance(carry, ModelCarry) \
            else _take(carry, idx)
        return SamplerState(carry, *(_take(f, idx) for f in x[1:]))
    return _take(x, idx)


def _concat(trees):
    def cat(*leaves):
        if all(isinstance(a, np.ndarray) for a in leaves):
            return np.concatenate(leaves, axis=0)
        return jnp.concatenate(leaves, axis=0)

    return jax.tree_util.tree_map(cat, *trees)


def concat_rows(parts: Sequence):
    """The rows of several ``SamplerState``s (or ``Controls``, or per-row pytrees) one after
    another, in order; ``ModelCarry`` params are taken from the first (they must be the same)."""
    parts = list(parts)
    first = parts[0]
    if isinstance(first, SamplerState):
        if isinstance(first.carry, ModelCarry):
            carry = ModelCarry(first.carry.params, _concat([p.carry.state for p in parts]))
        else:
            carry = _concat([p.carry for p in parts])
        rest = [_concat([p[i] for p in parts]) if first[i] is not None else None for i in range(1, len(first))]
        return SamplerState(carry, *rest)
    return _concat(parts)


def pad_prompts(prompts: Sequence) -> np.ndarray:
    """Prompts (id arrays, without the start token) as one ``int32 (B, P)`` batch: each row is
    its start token then its ids, left-padded with start tokens to ``P``, the smallest power of
    two that fits the longest. ``prime`` resets at every start token, so the padding changes
    nothing, and a few lengths serve every prompt (a compile per length, not per prompt)."""
    rows = [np.asarray(p, np.int32).ravel() for p in prompts]
    longest = max((len(r) for r in rows), default=0) + 1
    width = 1 << (longest - 1).bit_length()
    out = np.full((len(rows), width), START, np.int32)
    for i, r in enumerate(rows):
        if len(r):
            out[i, width - len(r):] = r
    return out


def prompt_counts(prompt_BxP: np.ndarray, vocab_size: int) -> np.ndarray:
    """Each row's character counts ``int32 (B, V)`` over its prompt after its last start token
    (the prime text): the starting counts of ``penalize_prime``."""
    prompt_BxP = np.asarray(prompt_BxP)
    out = np.zeros((prompt_BxP.shape[0], vocab_size), np.int32)
    for i, row in enumerate(prompt_BxP):
        starts = np.flatnonzero(row == START)
        text = row[starts[-1] + 1:] if starts.size else row
        np.add.at(out[i], text, 1)
    return out


class StopMatcher:
    """Ends one row's text at the first occurrence of any stop string, streaming.

    ``feed(piece) -> (emit, stopped)``: the text that is now certain (the part of what was fed
    that cannot be the start of a stop string, up to the first stop, which is not included)
    and whether a stop string was found. ``flush()`` returns the text held back, for when the
    row ends without a stop. The pieces emitted, plus the flush, concatenate to the final text.
    """

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = tuple(s for s in stops if s)
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self._buf = ""
        self.stopped = False

    def feed(self, piece: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stops:
            return piece, False
        buf = self._buf + piece
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._buf, self.stopped = "", True
            return buf[:min(hits)], True
        keep = 0  # the longest tail that is a proper prefix of some stop string
        for k in range(min(self._hold, len(buf)), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self.stops):
                keep = k
                break
        self._buf = buf[len(buf) - keep:]
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        out, self._buf = self._buf, ""
        return out


class RowText:
    """One sample's text as its tokens arrive, chunk by chunk: cut at the end token, ended
    before a stop string (``StopMatcher``), limited to ``length`` generated tokens.

    ``feed(tokens_C) -> (text, finish)``: the row's new text that is now certain, and why it
    has finished, or None while it runs: ``end_reason`` at the end token (``"end"``; OpenAI's
    ``"stop"`` for the server), ``"stop"`` before a stop string (not included), ``"length"``
    once ``length`` tokens are read. Tokens past the length are never read; once finished,
    ``feed`` returns ``("", finish)``. The texts returned concatenate to the row's final text:
    what was held back as a possible stop string comes out when the row ends otherwise.
    """

    def __init__(self, decode: Callable[[np.ndarray], str], length: int, stops: Sequence[str] = (),
                 end_reason: str = "end"):
        self._decode = decode
        self._stops = StopMatcher(stops)
        self._end_reason = end_reason
        self.remaining = length  # tokens the row may still read
        self.finish: Optional[str] = None

    @property
    def finished(self) -> bool:
        return self.finish is not None

    def feed(self, tokens_C: np.ndarray) -> tuple[str, Optional[str]]:
        if self.finish is not None:
            return "", self.finish
        row, ended = cut_at_end(np.asarray(tokens_C)[:self.remaining])
        self.remaining -= row.shape[0]
        text, stopped = self._stops.feed(self._decode(row))
        if stopped:
            self.finish = "stop"
        elif ended or self.remaining <= 0:
            self.finish = self._end_reason if ended else "length"
            text += self._stops.flush()
        return text, self.finish


def model_step_fn(graphdef, dtype=jnp.float32, labelled: bool = False) -> StepFn:
    """A ``step_fn`` for a Flax model whose parameters ride in the carry as ``(params, state)``.

    The parameters are then an input of the compiled sampler, not constants baked into it, so
    one compilation serves every checkpoint of the same shapes (and a large model does not
    make a large program). The sampler's loops prepare them once per call (``prepare``:
    ``CharRNN.step_weights``, on ``parallel.sampling_threads`` threads where the sampler runs
    alone on one device) and run ``prepared`` inside; called directly, ``step_fn`` is
    ``CharRNN.step``.

    ``labelled``: a labelled model's state is ``(label_term_BxG, carry)``: each row's label
    term (``CharRNN.label_term``) rides with its state, split with its rows, and a start token
    zeroes only ``carry``.
    """

    def step_fn(carry, token_B):
        params, state = carry
        model = nnx.merge(graphdef, params)
        if labelled:
            term, inner = state
            inner, logits_BxV = model.step_with(model.step_weights(dtype), inner, token_B, dtype, term)
            return (params, (term, inner)), logits_BxV
        state, logits_BxV = model.step(state, token_B, dtype)
        return (params, state), logits_BxV

    def prepare(params, alone: bool = False, rows: int = 1):
        model = nnx.merge(graphdef, params)
        threads = 1
        if alone:  # the native step kernel may split a step over the idle cores
            c = model.config
            threads = parallel.sampling_threads(parallel.step_weight_bytes(c.cell, c.layers, c.hidden,
                                                                           model.vocab_size))
        return model.step_weights(dtype, threads)

    def prepared(params, weights, state, token_B):
        # step_with reads only ``weights``; the merged module supplies the structure.
        model = nnx.merge(graphdef, params)
        if labelled:
            term, inner = state
            inner, logits_BxV = model.step_with(weights, inner, token_B, dtype, term)
            return (term, inner), logits_BxV
        return model.step_with(weights, state, token_B, dtype)

    step_fn.prepare = prepare
    step_fn.prepared = prepared
    if labelled:
        step_fn.reset_rows = lambda state, reset_B: (state[0], zero_rows(state[1], reset_B))
    return step_fn


def cut_at_end(tokens: np.ndarray) -> tuple[np.ndarray, bool]:
    """A row's generated tokens up to (not including) its first end token, and whether it had one."""
    end = np.flatnonzero(tokens == END)
    return (tokens[:end[0]], True) if end.size else (tokens, False)


def prompt_tokens(prime_ids: np.ndarray, num_samples: int) -> np.ndarray:
    """The prompt every sample starts from: the start token then the prime text, ``(N, 1 + P)``."""
    row = np.concatenate([[START], np.asarray(prime_ids, dtype=np.int32)]).astype(np.int32)
    return np.tile(row, (num_samples, 1))

"""Continuous batching: one background thread per model samples every live request's rows at once.

Requests join the running batch at the next chunk boundary and leave it when they finish (or
their client goes away), so many clients share one batched sampling loop instead of queueing
or each running their own. Each row keeps its own controls, stop strings and seed-derived key
(row ``i`` of a request seeded ``S`` draws from ``charrnn.sample.row_keys(S, n)[i]``), so a
row's text depends only on its request, never on which other requests share the batch: a
seeded request returns what ``charrnn sample --seed S -n N`` prints. A labelled run's rows carry
their label term in their state (``model_step_fn(..., labelled=True)``), so rows of different
labels share the batch too.

The batch is padded to a power of two with finished rows, and new prompts are primed in
power-of-two buckets of rows and length, so the sampler compiles a few programs, not one per
batch size.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import jax
import numpy as np

from charrnn import sample as sampler
from charrnn.serve.protocol import Job
from charrnn.vocab import START

log = logging.getLogger(__name__)

CHUNK = 64  # characters per dispatch: new requests join (and first characters leave) this often


def bucket(n: int) -> int:
    """The power of two at or above ``n`` (the batch sizes the sampler is compiled for)."""
    return 1 << max(0, int(n) - 1).bit_length()


class Completion:
    """One request in the engine: its ``n`` rows' events arrive on ``events`` (an asyncio queue
    of the loop that submitted it) as lists of ``(index, text, finish_reason_or_None)``, then
    ``None`` when every row has finished. ``cancel()`` frees its rows at the next chunk."""

    def __init__(self, job: Job, loop: Optional[asyncio.AbstractEventLoop] = None,
                 sink: Optional[Callable[[Optional[list]], None]] = None):
        self.job = job
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue() if loop is not None else None
        self._sink = sink
        self._cancelled = threading.Event()
        self.error: Optional[str] = None

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        self._cancelled.set()

    def _emit(self, item: Optional[list]) -> None:
        if self._sink is not None:
            self._sink(item)
        elif self.loop is not None and not self.loop.is_closed():
            try:
                self.loop.call_soon_threadsafe(self.events.put_nowait, item)
            except RuntimeError:  # the loop closed in between: nobody is listening any more
                pass


@dataclass
class _Row:
    completion: Completion
    index: int
    text: "sampler.RowText"  # its characters so far: end token, stop strings, max_tokens
    finished: bool = False  # ended, or cancelled by its client


@dataclass
class _Pending:
    completion: Completion
    rows: list = field(default_factory=list)


class Engine:
    """The batched sampler of one loaded run, driven by a background thread.

    Args:
        run: a ``charrnn.load`` result.
        max_batch: rows sampled at once; requests that do not fit wait for rows to free up.
        chunk: characters generated per dispatch (a multiple of 16).
    """

    def __init__(self, run, max_batch: int = 256, chunk: int = CHUNK):
        self.run = run
        self.vocab_size = run.vocab.size
        self.max_batch = max_batch
        self.max_batch_bucket = bucket(max_batch)
        self.chunk = chunk
        step_fn = sampler.model_step_fn(run.graphdef, run._dtype, labelled=run.labels is not None)
        # The penalty program keeps per-row character counts; the plain one is today's exact
        # computation and runs whenever no live row asks for a penalty (same tokens either way).
        self._prime, self._generate_pen = sampler.make_sampler(step_fn, chunk, penalties=True)
        _, self._generate_plain = sampler.make_sampler(step_fn, chunk, penalties=False)
        self._params = run.params
        self._pending: deque[Completion] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        # The live batch: device (or host) state with the params left out, and one entry per
        # slot (None: a padding row, already done).
        self._state = None
        self._slots: list[Optional[_Row]] = []
        self._padded = 0  # the batch size the last repad chose (rows that join come on top of it)
        self._controls = None
        self._penalized = False
        self._inflight = None  # (state after, tokens) of the chunk dispatched and not yet delivered
        self.chunks_run = 0

    # --- the public side, called from the server's threads ------------------------------

    def start(self, warm_up: bool = False) -> None:
        """Start the engine thread; ``warm_up``: compile the common programs first (``warm_up``),
        so the first requests do not wait for compilation (they queue meanwhile)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, args=(warm_up,), daemon=True,
                                            name=f"charrnn-engine-{self.run.run_dir.name}")
            self._thread.start()

    def submit(self, completion: Completion) -> None:
        """Queue a request; its rows join the batch at the next chunk boundary."""
        with self._cond:
            if self._stopping:
                completion.error = "the server is shutting down"
                completion._emit(None)
                return
            self._pending.append(completion)
            self._cond.notify()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the current chunk, end every request still in the engine, and join the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def live_rows(self) -> int:
        return sum(1 for r in self._slots if r is not None and not r.finished)

    @property
    def batch_rows(self) -> int:
        """Rows the sampler runs now: the live ones, padded to a compiled batch size."""
        return len(self._slots)

    # --- the engine thread ------------------------------------------------------------

    def _loop(self, warm_up: bool = False) -> None:
        if warm_up:
            try:
                self.warm_up()
            except Exception:  # only a head start: requests compile what they need anyway
                log.exception("warm-up failed")
        while True:
            with self._cond:
                while not self._stopping and not self._pending and self.live_rows == 0:
                    self._cond.wait()
                if self._stopping:
                    break
                joining = self._take_pending()
            try:
                self._step(joining)
            except Exception as e:  # a bug must not kill the server: fail the rows it touched
                log.exception("engine step failed")
                self._fail_all(joining, f"internal error in the sampler: {type(e).__name__}: {e}")
        self._fail_all([], "the server is shutting down")
        with self._cond:
            pending, self._pending = list(self._pending), deque()
        for c in pending:
            c.error = "the server is shutting down"
            c._emit(None)

    def _take_pending(self) -> list[Completion]:
        """Requests that fit in the batch now, first come first served (a request that does not
        fit blocks the ones behind it, so no large request starves)."""
        free = self.max_batch - self.live_rows
        out = []
        while self._pending:
            c = self._pending[0]
            if c.cancelled:
                self._pending.popleft()
                c._emit(None)
                continue
            if c.job.n > free:
                break
            self._pending.popleft()
            out.append(c)
            free -= c.job.n
        return out

    def _fail_all(self, joining: list[Completion], message: str) -> None:
        seen = set()
        for c in joining + [r.completion for r in self._slots if r is not None and not r.finished]:
            if id(c) not in seen:
                seen.add(id(c))
                c.error = message
                c._emit(None)
        self._state, self._slots, self._controls, self._inflight, self._padded = None, [], None, None, 0

    def _step(self, joining: list[Completion]) -> None:
        """One chunk. The next chunk is dispatched before this one's characters are decoded and
        sent, so the device computes while the host delivers; membership changes (rows that
        join, finish or are cancelled) first bring the chunk in flight home."""
        changed = self._retire()
        if (changed or joining) and self._inflight is not None:
            self._land()
            self._retire()
        if joining:
            self._join(joining)
            changed = True
        if not self._slots:
            return
        if changed:
            self._repad()
        base = self._inflight[0] if self._inflight is not None else self._state
        dispatched = self._dispatch(base)
        if self._inflight is not None:
            self._land()
        self._inflight = dispatched

    def _dispatch(self, state):
        """Start the next chunk from ``state`` (asynchronously): ``(next state, tokens)``."""
        generate = self._generate_pen if self._penalized else self._generate_plain
        full = state._replace(carry=sampler.ModelCarry(self._params, state.carry))
        if not self._penalized:
            full = full._replace(counts_BxV=None)
        out, toks = generate(full, self._controls)
        out = out._replace(carry=out.carry.state)
        if not self._penalized:  # rows without penalties never read their (stale) counts
            out = out._replace(counts_BxV=state.counts_BxV)
        self.chunks_run += 1
        return out, toks

    def _land(self) -> None:
        """Wait for the chunk in flight and deliver its characters."""
        out, toks = self._inflight
        self._inflight = None
        self._state = out
        self._deliver(np.asarray(toks))  # the sync point

    def _retire(self) -> bool:
        """Drop finished and cancelled rows from the slot list (not yet from the state)."""
        changed = False
        for i, r in enumerate(self._slots):
            if r is None:
                continue
            if r.completion.cancelled and not r.finished:
                r.finished = True
            if r.finished:
                self._slots[i] = None
                changed = True
        if changed and all(r is None for r in self._slots):
            self._state, self._slots, self._inflight, self._padded = None, [], None, 0
        return changed

    def _join(self, joining: list[Completion]) -> None:
        """Prime the joining requests' prompts and append their rows to the batch.

        Each request is primed on its own, in a batch of ``bucket(n)`` rows: the programs
        compiled are then one per (power of two up to ``max_n``, prompt length bucket), the
        same whatever mix of requests arrives together."""
        parts = [] if self._state is None else [_host(self._state)]
        for c in joining:
            job = c.job
            # OpenAI's finish_reason is "stop" at the end token as at a stop string.
            self._slots += [_Row(c, i, sampler.RowText(self.run.vocab.decode, job.max_tokens, job.stop, "stop"))
                            for i in range(job.n)]
            parts.append(self._prime_rows([job.prompt_ids] * job.n, np.asarray(sampler.row_keys(job.seed, job.n)),
                                          job.label_weights_NxL))
        self._state = sampler.concat_rows(parts)

    def _prime_rows(self, prompts: list, keys_Nx2: np.ndarray, label_weights_NxL=None):
        """The primed per-row state (numpy, params left out) of ``len(prompts)`` rows
        (``label_weights_NxL``: a labelled run's rows' label mixes; None primes label terms of 0)."""
        n = len(prompts)
        b = bucket(n)
        prompt_BxP = sampler.pad_prompts(list(prompts) + [np.zeros(0, np.int32)] * (b - n))
        keys = np.concatenate([keys_Nx2.astype(np.uint32), np.zeros((b - n, 2), np.uint32)])
        carry = sampler.ModelCarry(self._params, self._start_state(n, b, label_weights_NxL))
        counts = np.zeros((b, self.vocab_size), np.int32)
        primed = self._prime(carry, prompt_BxP, keys, counts)
        return sampler.take_rows(_host(primed._replace(carry=primed.carry.state)), np.arange(n))

    def _start_state(self, n: int, b: int, label_weights_NxL=None):
        """``Run._start_state`` of ``n`` rows (their label terms computed over exactly those rows,
        as ``Run.sample`` does: a product over another batch size may round a mix differently),
        padded with zero rows to ``b``. A labelled run's rows without weights (warm-up) get
        label terms of 0."""
        if self.run.labels is not None and label_weights_NxL is None:
            label_weights_NxL = np.zeros((n, self.run.labels.size), np.float32)
        state = self.run._start_state(n, label_weights_NxL)
        return jax.tree_util.tree_map(lambda a: np.pad(a, [(0, b - n)] + [(0, 0)] * (a.ndim - 1)), state)

    def warm_up(self, rows: int = 64, prompt: int = 64) -> None:
        """Compile now what requests will need: ``generate`` for every batch size bucket up to
        ``rows`` and ``prime`` for one row and prompts up to ``prompt`` characters (others
        compile on first use; ``charrnn serve`` also keeps them in XLA's persistent cache)."""
        b = 1
        while True:
            ids = [np.zeros(0, np.int32)] * b
            state = self._prime_rows(ids, np.zeros((b, 2), np.uint32))
            full = state._replace(carry=sampler.ModelCarry(self._params, state.carry), counts_BxV=None)
            controls = sampler.make_controls(self.vocab_size, rows=b)
            jax.block_until_ready(self._generate_plain(full, controls))
            if b >= min(rows, self.max_batch_bucket):
                break
            b *= 2
        p = 1
        while p <= prompt:
            self._prime_rows([np.full(max(p - 1, 0), START, np.int32)], np.zeros((1, 2), np.uint32))
            p *= 2

    def _repad(self) -> None:
        """Compact the batch to its live rows and pad it to a power of two with done rows."""
        live = [i for i, r in enumerate(self._slots) if r is not None]
        b = bucket(len(live))
        # Shrink only when three quarters of the batch are padding: rows leaving one by one
        # then do not step through (and compile) every smaller size on the way down. The size
        # kept is the last one chosen, not the slot count: rows that join are appended after
        # its padding, and counting that padding as rows doubled the batch.
        if self._padded >= b and len(live) * 4 > self._padded:
            b = self._padded
        self._padded = b
        idx = np.array(live + [live[0]] * (b - len(live)), np.int64)
        state = sampler.take_rows(_host(self._state), idx)
        done = np.array(state.done_B, bool)
        done[len(live):] = True
        self._state = state._replace(done_B=done)
        self._slots = [self._slots[i] for i in live] + [None] * (b - len(live))
        self._controls = self._make_controls()

    def _make_controls(self):
        jobs = [r.completion.job if r is not None else None for r in self._slots]
        v = self.vocab_size

        def col(f, default, dtype):
            return np.array([f(j) if j is not None else default for j in jobs], dtype)

        self._penalized = any(j is not None and (j.presence or j.frequency or j.repetition != 1.0) for j in jobs)
        return sampler.Controls(
            temperature=col(lambda j: j.temperature if j.temperature > 0 else 1.0, 1.0, np.float32),
            top_k=col(lambda j: min(j.top_k or v, v), v, np.int32),
            top_p=col(lambda j: j.top_p, 1.0, np.float32),
            greedy=col(lambda j: j.greedy, False, np.bool_),
            presence=col(lambda j: j.presence, 0.0, np.float32),
            frequency=col(lambda j: j.frequency, 0.0, np.float32),
            repetition=col(lambda j: j.repetition, 1.0, np.float32))

    def _deliver(self, toks_BxC: np.ndarray) -> None:
        """Decode each live row's new characters, apply its stop strings and length, and send
        each request one event for this chunk."""
        events: dict[int, tuple[Completion, list]] = {}
        for slot, r in enumerate(self._slots):
            if r is None or r.finished:
                continue
            c = r.completion
            if c.cancelled:
                r.finished = True
                continue
            text, finish = r.text.feed(toks_BxC[slot])
            if finish is not None:
                r.finished = True
            if text or finish is not None:
                events.setdefault(id(c), (c, []))[1].append((r.index, text, finish))
        # One wake-up of each event loop per chunk, not one per request: on a busy host the
        # loop's wake-ups compete with the sampler for the cores.
        by_loop: dict[int, tuple] = {}
        for c, items in events.values():
            out = [items]
            if all(r.finished for r in self._slots if r is not None and r.completion is c):
                out.append(None)
            if c._sink is not None or c.loop is None:
                for item in out:
                    c._emit(item)
                continue
            by_loop.setdefault(id(c.loop), (c.loop, []))[1].extend((c.events, item) for item in out)
        for loop, puts in by_loop.values():
            if not loop.is_closed():
                try:
                    loop.call_soon_threadsafe(_put_all, puts)
                except RuntimeError:  # the loop closed in between: nobody is listening any more
                    pass


def _put_all(puts) -> None:
    for queue, item in puts:
        queue.put_nowait(item)


def _host(state):
    """The state's per-row arrays as numpy (a no-op when they already are)."""
    return jax.tree_util.tree_map(np.asarray, state)

"""Truncated-BPTT training: optimizer, the jitted train step, evaluation, and the training loop."""

from __future__ import annotations

import ctypes
import logging
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from charrnn import checkpoint as ckpt
from charrnn import data as data_mod
from charrnn import hugepages, inference, parallel, runs
from charrnn import sample as sample_mod
from charrnn.config import DEFAULT_EPOCHS, RunConfig, TrainConfig
from charrnn.errors import CharrnnError
from charrnn.evaluate import compute_dtype, evaluate_stream, make_eval_fn, weighted_nll
from charrnn.model import CharRNN, build_model, split_model
from charrnn.vocab import END, NUM_SPECIAL, START

log = logging.getLogger(__name__)

class TrainState(NamedTuple):
    """Everything a training step reads and writes (a pytree; donated to the step)."""

    params: Any
    opt_state: Any
    step: jax.Array  # int32: optimizer steps taken
    rng: jax.Array  # uint32[2]: base key; dropout at step s uses fold_in(rng, s)


def lr_schedule(cfg: TrainConfig, total_steps: Optional[int]) -> optax.Schedule:
    """The learning rate at each step: linear warm-up, then constant, cosine or exponential decay.

    Cosine decays to a tenth of ``lr`` at ``total_steps``; exponential multiplies by 0.1 over
    the same span. Both need a known length (``--max-steps`` or ``--epochs``).
    """
    warm = cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        main = optax.constant_schedule(cfg.lr)
    else:
        if total_steps is None:
            raise CharrnnError(f"--lr-schedule {cfg.lr_schedule} needs a known length: "
                               f"pass --max-steps or --epochs")
        span = max(1, total_steps - warm)
        if cfg.lr_schedule == "cosine":
            main = optax.cosine_decay_schedule(cfg.lr, span, alpha=0.1)
        else:
            main = optax.exponential_decay(cfg.lr, span, decay_rate=0.1)
    if warm == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(cfg.lr / warm, cfg.lr, warm), main], [warm])


def make_optimizer(cfg: TrainConfig, lr: optax.ScalarOrSchedule) -> optax.GradientTransformation:
    """Gradient clipping by global norm (``grad_clip`` > 0) followed by the chosen optimizer."""
    if cfg.optimizer == "adam":
        opt = optax.adam(lr)
    elif cfg.optimizer == "adamw":
        opt = optax.adamw(lr, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "rmsprop":
        opt = optax.rmsprop(lr, decay=0.95)  # char-rnn's decay rate
    else:
        opt = optax.sgd(lr, momentum=0.9)
    if cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), opt)
    return opt


def init_state(model: CharRNN, optimizer: optax.GradientTransformation, seed: int):
    """``(graphdef, state)`` for a fresh run: parameters from the model, optimizer state, step 0."""
    graphdef, params = split_model(model)
    state = TrainState(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32),
                       rng=run_keys(seed)["dropout"])
    return graphdef, state


def run_keys(seed: int) -> dict[str, jax.Array]:
    """The run's named PRNG keys, all split once from ``seed``."""
    init, dropout, sample = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {"init": init, "dropout": dropout, "sample": sample}


def _reset_where(carry, reset):
    return jax.tree_util.tree_map(lambda c: jnp.where(reset, jnp.zeros_like(c), c), carry)


def _keep_freed_memory() -> None:
    """Let glibc's malloc keep freed blocks between steps, but hand back what compiling left.

    XLA:CPU allocates every step's temporaries (tens of MB: the scans' stacked per-step
    values) afresh. By default glibc serves blocks of 128 KiB and up with ``mmap`` and gives
    them back on ``free``, so each step touches ~50 MB of new pages: ~12k page faults, the
    kernel zeroing every page, and the first write to each buffer running at a few GB/s. Kept
    in the heap, the same memory is reused step after step (measured: 12.4k -> 0 faults per
    LSTM 2x128 step).

    Kept, though, the heap also holds on to the ~100-250 MB that compiling a train step frees
    (LLVM's working memory), and XLA then maps the step's temporaries (one block, 390 MB for
    LSTM 2x512 at batch 64) on top of it: that, not the model, made the peak RSS. So after
    every XLA compilation the free heap goes back to the kernel (``malloc_trim``); the step
    that follows refills the heap with what it reuses. LSTM 2x512, batch 64: peak RSS 890 ->
    785 MB. A no-op where the C library is not glibc.

    The mmap threshold cannot go above 32 MiB, and a step's temporaries are often one larger
    block per device (GRU 2x384, 32 rows x 50 characters on each of two devices: two blocks of
    ~54 MB), which glibc then still mapped and unmapped on every step: 27k page faults per
    step, ~23% of the step's time in the kernel. ``M_MMAP_MAX = 0`` serves every block from
    the heap (glibc still maps what a thread's own arena cannot hold, over 64 MiB), so those
    blocks are reused too: that step 19.8k -> 27.4k chars/s, GRU 2x256 float32 25.8k -> 34.0k,
    peak RSS of the benchmark's training runs unchanged. One arena for every thread
    (``M_ARENA_MAX = 1``) would keep the larger blocks too (LSTM 2x512 7.3k -> 8.3k chars/s,
    GRU 2x512 bf16 13.2k -> 17.5k), but the one heap fragments: LSTM 2x512's peak RSS 672 ->
    848 MB, above PyTorch's ~705. Not taken.
    """
    if _keep_freed_memory.done:
        return
    _keep_freed_memory.done = True
    if hugepages.asked():
        log.info("malloc: GLIBC_TUNABLES=%s", os.environ["GLIBC_TUNABLES"])
    elif hugepages.rerun_env() is not None:
        log.info("malloc: start Python with GLIBC_TUNABLES=%s=1 for ~20%% faster steps (charrnn train "
                 "does): see charrnn.hugepages", hugepages.TUNABLE)
    try:
        libc = ctypes.CDLL(None)
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -2, -3, -4
    mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's largest allowed value
    mallopt(M_MMAP_MAX, 0)  # and larger blocks from the heap too
    mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1)
    mallopt(M_TOP_PAD, 16 << 20)
    _release_freed_memory.trim = trim
    jax.monitoring.register_event_duration_secs_listener(_after_compile)


_keep_freed_memory.done = False
_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def _after_compile(event: str, duration_secs: float, **kwargs) -> None:
    if event == _BACKEND_COMPILE_EVENT:
        _release_freed_memory()


def _release_freed_memory() -> None:
    """Return the heap's free pages to the kernel (glibc's ``malloc_trim``)."""
    if _release_freed_memory.trim is not None:
        _release_freed_memory.trim(0)


_release_freed_memory.trim = None

MEMORY_SAVING_SCHEDULE = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
DETERMINISTIC_GPU_OPS = "--xla_gpu_deterministic_ops=true"


def use_memory_saving_schedule() -> bool:
    """Have XLA:CPU order each program's operations to keep the fewest buffers alive.

    Its default scheduler starts independent work as early as it can, for parallelism: in a
    train step that includes allocating the zero-filled output stacks of every scan (one
    ``(T, B, H)`` array per saved value, layer and direction) before the forward pass, so
    they all live at once. The memory-minimising one
    keeps LSTM 2x512 (batch 64) at 261 MB of temporaries instead of 392, peak RSS 785 -> 650 MB
    on one device (699 on two; PyTorch's nn.LSTM: ~720), and the train steps ran as fast (the
    concurrency it gives up overlapped little on two cores). ``charrnn train`` calls this before
    JAX starts; ``train`` does too, where the backends are not up yet. It must run before JAX
    initialises its backends (XLA reads its flags once; a per-compile ``compiler_options``
    entry is not honoured by JAX 0.10.2's CPU client). Returns whether it took effect. Only
    XLA:CPU reads the flag.
    """
    return _add_xla_flag(MEMORY_SAVING_SCHEDULE)


def use_deterministic_gpu_ops() -> bool:
    """Have XLA:GPU compute every operation the same way on every run.

    Exact resume (a run stopped and resumed equals one that never stopped, bit for bit) needs
    a train step that gives the same bits for the same inputs. On a GPU one operation does not:
    the gradient of the input layer's row gather is a scatter-add, which XLA:GPU runs with
    atomic additions in whatever order the threads arrive (seen on an H100: ~1e-10 differences
    in ``w_ih``'s Adam moments after a resume). With the flag it sorts them instead; the train
    step's other work is already deterministic. Like ``use_memory_saving_schedule`` it must run
    before JAX initialises its backends, and returns whether it took effect; XLA:CPU ignores it.
    """
    return _add_xla_flag(DETERMINISTIC_GPU_OPS)


def use_training_xla_flags() -> None:
    """Both of the above: the XLA flags a training process asks for before JAX starts."""
    use_memory_saving_schedule()
    use_deterministic_gpu_ops()


def _add_xla_flag(flag: str) -> bool:
    flags = os.environ.get("XLA_FLAGS", "")
    if flag.split("=")[0] in flags or parallel.backends_started():
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()
    return True


def make_train_step(graphdef, optimizer: optax.GradientTransformation, cfg: TrainConfig,
                    *, unroll: int = 1, jit: bool = True):
    """Build ``train_step(state, carry, batch) -> (state, carry, metrics)``.

    ``batch`` is ``(x_BxT, y_BxT, reset)``; ``reset`` zeroes the carried state first (epoch
    start). The loss is the mean cross-entropy in nats over the targets that are characters or
    the end token (a start token always follows an end token, so it is not scored). A step whose
    loss or gradient is not finite changes nothing but the bad-step counter, and resets the carry.

    With more than one device the step runs under ``shard_map`` on ``parallel.data_mesh()``
    (state replicated, batch rows and carry split, as ``parallel.DataParallel`` places them):
    each device runs the forward and backward pass on its own rows and the gradients are
    summed with one ``psum`` per step; every device then applies the same update. (Left to
    automatic sharding, the same program ran the devices nearly in lockstep and gained ~10%;
    with ``shard_map`` two CPU devices on two cores train ~1.9x as fast as one.) The loss is
    the same function of the whole batch as on one device, dropout masks included.
    """
    _keep_freed_memory()
    dtype = compute_dtype(cfg.dtype)
    mesh = parallel.data_mesh()
    split = mesh.size > 1

    def loss_fn(params, carry, x_BxT, y_BxT, key, rows):
        model = nnx.merge(graphdef, params)
        carry, logits_BxTxV = model(carry, x_BxT, dropout_key=key, dtype=dtype, unroll=unroll,
                                    dropout_rows=rows)
        total, _ = weighted_nll(logits_BxTxV, y_BxT, (y_BxT != START).astype(jnp.float32))
        return total, carry

    def train_step(state: TrainState, carry, batch):
        x_BxT, y_BxT, reset = batch
        carry = _reset_where(carry, reset)
        key = jax.random.fold_in(state.rng, state.step)
        count = jnp.sum((y_BxT != START).astype(jnp.float32))
        rows = None
        if split:  # this device's rows of the whole batch; the loss is over the whole batch
            rows = (jax.lax.axis_index(parallel.AXIS) * x_BxT.shape[0], x_BxT.shape[0] * mesh.size)
        # The summed loss and its gradient, divided by the batch's target count only after the
        # devices' sums are added: one all-reduce per step. (A psum of the count before the
        # forward pass made each device wait there for the other, whichever XLA ran first.)
        (total, new_carry), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, carry, x_BxT, y_BxT, key, rows)
        if split:
            total, grads, count = jax.lax.psum((total, grads, count), parallel.AXIS)
        count = jnp.maximum(count, 1.0)
        loss = total / count
        grads = jax.tree_util.tree_map(lambda g: g * (1.0 / count), grads)
        new_carry = jax.lax.stop_gradient(new_carry)
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
        state = TrainState(
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            step=state.step + 1,
            rng=state.rng,
        )
        new_carry = _reset_where(new_carry, ~ok)
        metrics = {"loss": loss, "grad_norm": grad_norm, "ok": ok}
        return state, new_carry, metrics

    if split:
        rows_spec = P(parallel.AXIS)
        # check_vma=False: the replicated outputs (state, metrics) are computed from psum'd
        # values, so they are equal on every device; the check cannot see through the
        # cells' custom_vjp.
        train_step = jax.shard_map(train_step, mesh=mesh, in_specs=(P(), rows_spec, (rows_spec, rows_spec, P())),
                                   out_specs=(P(), rows_spec, P()), check_vma=False)
    return jax.jit(train_step, donate_argnums=(0, 1)) if jit else train_step


# --- the training loop -------------------------------------------------------------------

@dataclass
class TrainResult:
    """What a finished ``train`` call reports.

    ``stop_reason`` is one of ``steps``, ``epochs``, ``minutes``, ``patience`` or the name of
    the signal that interrupted training (``SIGINT``, ``SIGTERM``).
    """

    run_dir: Path
    step: int
    stop_reason: str
    last_val: Optional[dict]
    best_val: Optional[float]
    train_loss: Optional[float]


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> Optional[int]:
    """The step count at which training ends, or None when only ``--minutes`` bounds it."""
    limits = []
    if cfg.max_steps is not None:
        limits.append(cfg.max_steps)
    epochs = cfg.epochs
    if cfg.max_steps is None and cfg.epochs is None and cfg.minutes is None:
        epochs = DEFAULT_EPOCHS
    if epochs is not None:
        limits.append(max(1, int(round(epochs * steps_per_epoch))))
    return min(limits) if limits else None


def _load_corpus(corpus, config: RunConfig):
    """The corpus and the vocabulary of its characters (a first streaming pass)."""
    corp = corpus if isinstance(corpus, data_mod.Corpus) else data_mod.load_corpus(str(corpus), config.data.encoding)
    vocab, num_tokens = data_mod.corpus_vocab(corp, config.data.docs)
    return corp, vocab, num_tokens


def train(corpus, config: Optional[RunConfig] = None, out: Optional[Path] = None, *, resume: bool = False,
          overwrite: bool = False, init_from: Optional[Path] = None, on_event: Optional[Callable[[dict], None]] = None,
          should_stop: Optional[Callable[[], Optional[str]]] = None) -> TrainResult:
    """Train a model on ``corpus`` and write the run directory.

    Args:
        corpus: a path, a corpus name (see ``charrnn.data.load_corpus``) or a loaded ``Corpus``.
        config: the run's configuration; with ``resume`` and None, the run's saved one.
        out: the run directory (default ``checkpoints/<corpus name>``).
        resume: continue the run in ``out`` from its latest checkpoint, exactly as if it had
            not stopped. Model, data and batch layout settings must match the run's.
        overwrite: start afresh in ``out`` even if it holds a run (its files are deleted).
        init_from: a run directory to fine-tune from: its weights are copied, characters it
            knows keep their ids, new ones are appended with fresh rows; the optimizer starts
            fresh. Its architecture (cell, layers, hidden) is used.
        on_event: called with progress events (dicts with an ``"event"`` key: ``start``,
            ``step``, ``log``, ``eval``, ``save``, ``end``); the CLI draws its progress bar from
            them. The library never prints.
        should_stop: polled once per step; a non-None return (a reason such as ``"SIGINT"``)
            ends training after the current step with a checkpoint.

    Returns:
        A ``TrainResult``.

    Called before anything has started JAX's backends, it also selects XLA:CPU's
    memory-saving schedule and XLA:GPU's deterministic operations for the process
    (``use_memory_saving_schedule``, ``use_deterministic_gpu_ops``).

    Raises:
        CharrnnError: for unusable input or settings, with a message for the user.
    """
    use_training_xla_flags()
    emit = on_event or (lambda e: None)
    should_stop = should_stop or (lambda: None)
    if config is None and not resume:
        config = RunConfig()
    corpus_label = corpus.name if isinstance(corpus, data_mod.Corpus) else str(corpus)

    # --- run directory and configuration -------------------------------------------------
    source = None  # the run fine-tuned from, if any
    if resume:
        if out is None:
            raise CharrnnError("--resume needs --out RUN_DIR naming the run to continue")
        run_dir = Path(out)
        saved, vocab = runs.read_run_files(run_dir)
        config = config or saved
        diffs = runs.config_differences(saved, config)
        if diffs:
            raise CharrnnError(f"cannot resume {run_dir}: settings differ from the run's: " + "; ".join(diffs))
        corp, corpus_vocab, num_tokens = _load_corpus(corpus, config)
        missing = runs.vocab_difference(vocab, corpus_vocab.chars)
        if missing:
            raise CharrnnError(f"cannot resume {run_dir} on {corp.name}: {missing}")
    else:
        corp, vocab, num_tokens = _load_corpus(corpus, config)
        run_dir = Path(out) if out is not None else Path("checkpoints") / corp.name
        if run_dir.exists() and (ckpt.list_checkpoints(run_dir) or (run_dir / runs.CONFIG_FILE).exists()):
            if not overwrite:
                raise CharrnnError(f"{run_dir} already holds a run: pass --resume to continue it, "
                                   f"--overwrite to replace it, or choose another --out")
        if init_from is not None:
            source = inference.load(Path(init_from), "best")
            config = replace(config, model=replace(source.config.model, dropout=config.model.dropout))
            vocab = source.vocab.extended(vocab.chars)
    config = replace(config, corpus=config.corpus or corpus_label)
    cfg = config.train

    # Everything that can refuse the run is checked before anything is written.
    n_val = int(num_tokens * config.data.val_frac)
    _, steps_per_epoch = data_mod.StreamBatches.layout(num_tokens - n_val, cfg.batch_size, cfg.seq_len)
    end_step = total_steps(cfg, steps_per_epoch)
    schedule = lr_schedule(cfg, end_step)
    optimizer = make_optimizer(cfg, schedule)
    dp = parallel.DataParallel(cfg.batch_size)
    main = dp.is_main
    if not main:
        emit = lambda e: None  # noqa: E731 (only the first process reports)

    if overwrite and not resume:
        runs.remove_run(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tokens_file = runs.TOKENS_FILE if main else f"tokens-p{jax.process_index()}.npy"
    encoded = data_mod.encode_corpus(corp, config.data.docs, vocab, run_dir / tokens_file)
    train_stream, val_stream = data_mod.split_train_val(encoded.stream, config.data.val_frac)
    batches = data_mod.StreamBatches(train_stream, cfg.batch_size, cfg.seq_len)
    keys = run_keys(cfg.seed)
    model = build_model(config.model, vocab.size, keys["init"])
    if source is not None:
        nnx.update(model, nnx.State(transplant(source.params, split_model(model)[1], source.vocab.size)))
    graphdef, state = init_state(model, optimizer, cfg.seed)
    carry = model.initial_carry(cfg.batch_size)
    fingerprint = encoded.sha256

    progress = {"best_val": None, "best_step": None, "evals_since_best": 0, "last_val": None,
                "bad_in_a_row": 0, "bad_total": 0}
    log_losses: list[float] = []  # losses since the last train record (saved, so resume logs the same)
    if resume:
        ckpt.clean_temporaries(run_dir)
        if ckpt.read_pointer(run_dir, "latest") is None:
            # Killed before its first checkpoint: nothing to continue, so start from step 0.
            log.warning("%s has no checkpoint yet; starting from step 0", run_dir)
            if main:
                runs.truncate_metrics(run_dir, 0)
        else:
            state, carry, meta = load_train_state(run_dir, state, carry)
            for k in progress:
                progress[k] = meta.get(k, progress[k])
            log_losses.extend(float(v) for v in meta.get("log_losses", []))
            if meta.get("corpus_sha256") != fingerprint:
                log.warning("the corpus differs from the one this run was trained on; continuing anyway")
            if main:
                runs.truncate_metrics(run_dir, int(meta["step"]))
    else:
        ckpt.clean_temporaries(run_dir)
    if main:
        runs.write_run_files(run_dir, config, vocab)
    state = dp.replicate(state)
    carry = dp.shard_rows(dp.local_part(carry))

    step_fn = make_train_step(graphdef, optimizer, cfg)
    sample_fns = None
    if cfg.sample_every:
        # Parameters ride in the sampler's carry so one compiled sampler serves every step.
        sample_fns = sample_mod.make_sampler(sample_mod.model_step_fn(graphdef))
    eval_fn = make_eval_fn(graphdef, cfg.dtype)
    step = int(state.step)
    have_val = len(val_stream) >= 2
    emit({"event": "start", "run_dir": str(run_dir), "step": step, "total_steps": end_step,
          "steps_per_epoch": batches.steps_per_epoch, "chars_per_step": batches.chars_per_step,
          "train_chars": len(train_stream), "val_chars": len(val_stream), "vocab_size": vocab.size,
          "devices": jax.device_count(), "platform": jax.devices()[0].platform,
          "params": sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.params))})

    def evaluate() -> dict:
        val = evaluate_stream(graphdef, dp.local_copy(state.params), model.initial_carry, val_stream,
                              num_streams=cfg.batch_size, seq_len=cfg.seq_len, eval_fn=eval_fn)
        improved = progress["best_val"] is None or val["nats"] < progress["best_val"]
        if improved:
            progress.update(best_val=val["nats"], best_step=step, evals_since_best=0)
        else:
            progress["evals_since_best"] += 1
        progress["last_val"] = val
        record = {"event": "eval", "step": step, "chars": step * batches.chars_per_step,
                  "val_loss": val["nats"], "val_bits": val["bits"], "best": improved,
                  "elapsed_s": round(time.monotonic() - t_start, 3)}
        if main:
            runs.append_metrics(run_dir, record)
        emit(record)
        return record

    def show_sample() -> None:
        controls = sample_mod.make_controls(vocab.size, 1.0)
        prompt = sample_mod.prompt_tokens(np.zeros(0, np.int32), 1)
        toks = np.concatenate(list(sample_mod.generate_stream(
            *sample_fns, (dp.local_copy(state.params), model.initial_carry(1)), prompt, keys["sample"], controls,
            cfg.sample_length)), axis=1)[0]
        end = np.flatnonzero(toks == END)
        text = vocab.decode(toks[:end[0]] if end.size else toks)
        record = {"event": "sample", "step": step, "text": text}
        if main:
            runs.append_metrics(run_dir, record)
        emit(record)

    def save(best: bool) -> None:
        epoch, window = batches.position(step)
        meta = {"step": step, "epoch": epoch, "window": window, "chars_seen": step * batches.chars_per_step,
                "corpus_sha256": fingerprint, "log_losses": list(log_losses), **progress}
        tensors = dp.to_host(train_state_tensors(state, carry))  # every process joins the gather
        if not main:
            return
        path = ckpt.write_checkpoint(run_dir, step, tensors, meta)
        ckpt.set_pointer(run_dir, "latest", path.name)
        ckpt.fault_point("save-pointer-moved")
        if best:
            ckpt.set_pointer(run_dir, "best", path.name)
        ckpt.prune(run_dir, cfg.keep)
        emit({"event": "save", "step": step, "path": str(path), "best": best})

    t_start = time.monotonic()
    if source is not None and have_val:
        evaluate()  # where fine-tuning starts from, on the new corpus
    deadline = t_start + cfg.minutes * 60 if cfg.minutes else None
    pending = None  # the previous step's metrics, read one step late so the host never waits
    t_log, step_log = time.monotonic(), step
    reason = None
    last_loss = None
    # A resumed run's starting point is already evaluated and saved: never rewrite it.
    evaluated_at = saved_at = step if resume else None

    def absorb(s: int, metrics) -> None:
        nonlocal last_loss, t_log, step_log
        m = jax.device_get(metrics)
        if not m["ok"]:
            progress["bad_in_a_row"] += 1
            progress["bad_total"] += 1
            emit({"event": "bad_step", "step": s, "in_a_row": progress["bad_in_a_row"]})
            if progress["bad_in_a_row"] >= cfg.max_bad_steps:
                raise CharrnnError(
                    f"training stopped at step {s}: {progress['bad_in_a_row']} steps in a row had a non-finite "
                    f"loss or gradient; the last good checkpoint in {run_dir} is kept "
                    f"(try a lower --lr or --grad-clip)")
            return
        progress["bad_in_a_row"] = 0
        last_loss = float(m["loss"])
        log_losses.append(last_loss)
        emit({"event": "step", "step": s, "loss": last_loss})
        if s % cfg.log_every == 0:
            now = time.monotonic()
            loss = float(np.mean(log_losses))
            record = {"event": "train", "step": s, "chars": s * batches.chars_per_step, "loss": loss,
                      "bits": loss / math.log(2), "lr": float(schedule(s)),
                      "chars_per_s": round((s - step_log) * batches.chars_per_step / max(now - t_log, 1e-9), 1),
                      "elapsed_s": round(now - t_start, 3)}
            if main:
                runs.append_metrics(run_dir, record)
            emit(record)
            log_losses.clear()
            t_log, step_log = now, s

    while True:
        if end_step is not None and step >= end_step:
            reason = "steps" if cfg.max_steps is not None and step >= cfg.max_steps else "epochs"
            break
        # Every process must agree to stop at the same step (a signal may reach only one).
        reason = "minutes" if deadline is not None and time.monotonic() >= deadline else should_stop()
        if dp.any(bool(reason)):
            reason = reason or "stopped by another process"
            break
        x_BxT, y_BxT = dp.shard_rows(batches.batch(step, dp.local_rows))
        reset = np.bool_(batches.starts_epoch(step))
        state, carry, metrics = step_fn(state, carry, (x_BxT, y_BxT, reset))
        step += 1
        if pending is not None:
            absorb(*pending)
        pending = (step, metrics)
        if (step % cfg.eval_every == 0 or step % cfg.checkpoint_every == 0
                or (sample_fns is not None and step % cfg.sample_every == 0)):
            absorb(*pending)
            pending = None
            best = False
            if have_val and step % cfg.eval_every == 0:
                best = evaluate()["best"]
                evaluated_at = step
            # No checkpoint in the middle of a run of non-finite steps: the last good one stays latest.
            if (step % cfg.checkpoint_every == 0 or best) and progress["bad_in_a_row"] == 0:
                save(best)
                saved_at = step
            if sample_fns is not None and step % cfg.sample_every == 0:
                show_sample()
            if cfg.patience and progress["evals_since_best"] >= cfg.patience:
                reason = "patience"
                break
    if pending is not None:
        absorb(*pending)
    interrupted = reason not in ("steps", "epochs", "minutes", "patience")
    best = False
    if have_val and evaluated_at != step and not interrupted:
        best = evaluate()["best"]
    if saved_at != step or best:
        save(best or not have_val)
    result = TrainResult(run_dir=run_dir, step=step, stop_reason=reason, last_val=progress["last_val"],
                         best_val=progress["best_val"], train_loss=last_loss)
    emit({"event": "end", "step": step, "reason": reason, "best_val": progress["best_val"]})
    return result


def save_train_state(run_dir: Path, state: TrainState, carry, meta: dict) -> Path:
    """Commit ``state`` and ``carry`` as checkpoint ``ckpt-<step>`` in ``run_dir`` (one process)."""
    return ckpt.write_checkpoint(run_dir, int(meta["step"]), jax.device_get(train_state_tensors(state, carry)), meta)


def _checkpoint_parts(state: TrainState, carry) -> dict[str, Any]:
    """What a checkpoint holds, by tensor-name prefix (one list for saving and loading)."""
    return {"params": state.params, "opt": state.opt_state, "carry": carry, "step": state.step, "rng": state.rng}


def train_state_tensors(state: TrainState, carry) -> dict[str, Any]:
    """The named arrays a checkpoint holds (still on device)."""
    named = {}
    for prefix, tree in _checkpoint_parts(state, carry).items():
        named.update(runs.flatten(tree, prefix))
    return named


def load_train_state(run_dir: Path, template: TrainState, carry_template, which: str = "latest"):
    """Restore ``(state, carry, meta)`` from a run's checkpoint, validated against the templates."""
    parts = _checkpoint_parts(template, carry_template)
    path = ckpt.resolve(run_dir, which)
    tensors, meta = ckpt.read_checkpoint(path, runs.expected_shapes(parts))
    restored = {k: runs.unflatten(v, k, tensors) for k, v in parts.items()}
    if not isinstance(meta.get("step"), int) or meta["step"] != int(restored["step"]):
        raise ckpt.CheckpointError(f"{path / ckpt.META_FILE}: field 'step' does not match the saved state")
    as_jax = lambda t: jax.tree_util.tree_map(jnp.asarray, t)  # noqa: E731
    state = TrainState(params=as_jax(restored["params"]), opt_state=as_jax(restored["opt"]),
                       step=jnp.asarray(restored["step"]), rng=jnp.asarray(restored["rng"]))
    return state, as_jax(restored["carry"]), meta


def transplant(source_params, target_params, source_vocab_size: int):
    """``target_params`` with every weight copied from ``source_params``.

    Tensors whose vocabulary axis grew (the first layer's input rows, the output columns) get
    the source's rows for the old ids and keep their fresh initialisation for the new ones,
    except the output bias of a new character: it starts at the source's lowest output bias,
    as likely as the rarest known character, so the model's loss on old text is where the
    source run ended instead of paying for characters it has never seen.
    """
    src = runs.flatten(source_params, "p")
    out = {}
    for name, t in runs.flatten(target_params, "p").items():
        s = np.asarray(src[name])
        t = np.array(t)
        if s.shape == t.shape:
            t = s
        elif s.ndim == t.ndim and s.shape[0] == source_vocab_size and s.shape[1:] == t.shape[1:]:
            t[:source_vocab_size] = s
        elif s.ndim == t.ndim and s.shape[-1] == source_vocab_size and s.shape[:-1] == t.shape[:-1]:
            t[..., :source_vocab_size] = s
        else:
            raise CharrnnError(f"cannot fine-tune: parameter {name[2:]} has shape {list(s.shape)} in the source "
                               f"run and {list(t.shape)} here")
        if name == "p/b_out" and t.shape[0] > source_vocab_size:
            t[source_vocab_size:] = s[NUM_SPECIAL:].min()
        out[name] = jnp.asarray(t)
    return runs.unflatten(target_params, "p", out)

"""The training loop: prepare the run, build or restore the state, step, evaluate and checkpoint, stop."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Optional

import jax
import numpy as np
from flax import nnx

from charrnn import batches as batches_mod
from charrnn import checkpoint as ckpt
from charrnn import data as data_mod
from charrnn import inference, parallel, runs
from charrnn import labels as labels_mod
from charrnn import sample as sample_mod
from charrnn.config import DEFAULT_EPOCHS, RunConfig, TrainConfig, check_argument
from charrnn.errors import CharrnnError
from charrnn.evaluate import evaluate_stream, make_eval_fn
from charrnn.model import build_model, split_model
from charrnn.train_step import TrainState, init_state, lr_schedule, make_optimizer, make_train_step, run_keys
from charrnn.vocab import Vocab

log = logging.getLogger(__name__)

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
    """The corpus, the vocabulary of its characters (a first streaming pass) and, for a labelled
    run, its documents with their labels (``charrnn.labels``; the corpus is then those
    documents in stream order, one per entry, read with ``docs="file"``)."""
    if labels_mod.labelled(config):
        if isinstance(corpus, data_mod.Corpus):
            raise CharrnnError(f"--labels {config.data.labels} reads a path, not a loaded corpus")
        docs = labels_mod.read_labelled(str(corpus), config.data.labels, config.data.docs, config.data.encoding)
        corp = docs.corpus()
        vocab, num_tokens = data_mod.corpus_vocab(corp, "file")
        return corp, vocab, num_tokens, docs
    corp = corpus if isinstance(corpus, data_mod.Corpus) else data_mod.load_corpus(str(corpus), config.data.encoding)
    vocab, num_tokens = data_mod.corpus_vocab(corp, config.data.docs)
    return corp, vocab, num_tokens, None


# --- 1. prepare the run: every check that can refuse it, before anything is written -------

@dataclass(frozen=True)
class RunPlan:
    """A run checked and ready to start; nothing has been written for it yet."""

    run_dir: Path
    config: RunConfig
    vocab: Vocab
    corpus: data_mod.Corpus
    resume: bool
    overwrite: bool
    source: Optional[inference.Run]  # the run fine-tuned from (``init_from``)
    end_step: Optional[int]
    labelled: Optional[labels_mod.LabelledDocuments] = None  # a labelled run's documents


def plan_run(corpus, config: Optional[RunConfig], out: Optional[Path], *, resume: bool = False,
             overwrite: bool = False, init_from: Optional[Path] = None) -> RunPlan:
    """Check the run directory, the settings against a resumed run's, the corpus and the
    length, and return the plan; ``CharrnnError`` for anything that refuses the run."""
    if config is None and not resume:
        config = RunConfig()
    corpus_label = corpus.name if isinstance(corpus, data_mod.Corpus) else str(corpus)
    source = None
    if resume:
        if out is None:
            raise CharrnnError("--resume needs --out RUN_DIR naming the run to continue")
        run_dir = Path(out)
        runs.check_out_dir(run_dir, resume=True, overwrite=overwrite)
        _recover_replaced(run_dir)  # so the run read below is the one that survives
        saved, vocab = runs.read_run_files(run_dir)
        config = config or saved
        diffs = runs.config_differences(saved, config)
        if diffs:
            raise CharrnnError(f"cannot resume {run_dir}: settings differ from the run's: " + "; ".join(diffs))
        corp, corpus_vocab, num_tokens, docs = _load_corpus(corpus, config)
        missing = runs.vocab_difference(vocab, corpus_vocab.chars)
        if missing:
            raise CharrnnError(f"cannot resume {run_dir} on {corp.name}: {missing}")
        saved_labels = labels_mod.read_vocab(run_dir, saved)
        if docs is not None and saved_labels.names != docs.names:
            raise CharrnnError(f"cannot resume {run_dir} on {corp.name}: its labels differ from the run's "
                               f"({', '.join(docs.names)} against {', '.join(saved_labels.names)})")
    else:
        corp, vocab, num_tokens, docs = _load_corpus(corpus, config)
        run_dir = Path(out) if out is not None else Path("checkpoints") / corp.name
        if jax.process_index() == 0:  # the others write only their own tokens-pN.npy into it
            _recover_replaced(run_dir)
            runs.check_out_dir(run_dir, resume=False, overwrite=overwrite)
        if init_from is not None and docs is not None:
            raise CharrnnError("--init-from does not take --labels yet: train a labelled run from scratch")
        if init_from is not None:
            source = inference.load(Path(init_from), "best")
            config = replace(config, model=replace(source.config.model, dropout=config.model.dropout))
            vocab = source.vocab.extended(vocab.chars)
    config = replace(config, corpus=config.corpus or corpus_label)
    cfg = config.train
    n_val = int(num_tokens * config.data.val_frac)
    _, steps_per_epoch = batches_mod.StreamBatches.layout(num_tokens - n_val, cfg.batch_size, cfg.seq_len)
    end_step = total_steps(cfg, steps_per_epoch)
    lr_schedule(cfg, end_step)  # refuses a decay that needs a known length
    return RunPlan(run_dir, config, vocab, corp, resume, overwrite, source, end_step, docs)


def _recover_replaced(run_dir: Path) -> None:
    """Undo an ``--overwrite`` killed before its first checkpoint (under the lock), if one was."""
    if (run_dir / runs.REPLACED_DIR).is_dir() and not (run_dir / runs.REPLACED_DIR).is_symlink():
        with runs.RunLock(run_dir):
            runs.recover(run_dir)


@contextlib.contextmanager
def claim_run_dir(plan: RunPlan, main: bool = True):
    """Hold ``plan.run_dir`` while training: its lock, leftovers of killed runs recovered, and for
    ``--overwrite`` the old run moved aside, put back unless the new run commits a checkpoint.

    Only the main process writes the run's shared files; the others just need the directory.
    """
    run_dir = plan.run_dir
    runs.make_run_dir(run_dir)
    if not main:
        _run_dir_ready()  # the main process's cleanup must not meet this one's tokens-pN.npy
        yield
        return
    with runs.RunLock(run_dir):
        runs.check_out_dir(run_dir, resume=plan.resume, overwrite=plan.overwrite)  # again, now we hold it
        if runs.recover(run_dir) and plan.resume:
            raise CharrnnError(f"{run_dir}: an --overwrite killed before its first checkpoint had set this "
                               f"run aside; it is restored now: run the command again")
        replaced = False
        try:
            if plan.overwrite and not plan.resume:
                replaced = runs.move_run_aside(run_dir)
            elif not plan.resume:
                runs.remove_run(run_dir)  # a start cut short before it wrote anything worth keeping
            runs.write_marker(run_dir)
            _run_dir_ready()
            yield
        finally:
            if replaced and (run_dir / runs.REPLACED_DIR).is_dir():  # the new run never committed
                runs.restore_replaced(run_dir)


def _run_dir_ready() -> None:
    """With several processes: everyone waits here until the main process has claimed and
    cleaned the run directory."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("charrnn: run directory claimed")


# --- 2-5. the state, the step loop, evaluation and checkpoints, stopping -------------------

NATURAL_ENDS = ("steps", "epochs", "minutes", "patience")


@dataclass
class Progress:
    """What the loop has done beyond the tensors: saved in every checkpoint's meta, so a resumed
    run continues exactly (``log_losses``: the losses since the last train record)."""

    best_val: Optional[float] = None
    best_step: Optional[int] = None
    evals_since_best: int = 0
    last_val: Optional[dict] = None
    bad_in_a_row: int = 0
    bad_total: int = 0
    log_losses: list = field(default_factory=list)

    def to_meta(self) -> dict:
        return {f.name: copy.copy(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_meta(cls, meta: dict) -> "Progress":
        return cls(**{f.name: meta[f.name] for f in fields(cls) if f.name in meta})


class Trainer:
    """One training run in named parts: ``build`` (make or restore the state), ``run`` (the
    step loop), ``evaluate``/``save``/``show_sample`` at its boundaries, ``finish`` (the last
    evaluation and checkpoint, and the result)."""

    def __init__(self, plan: RunPlan, dp: parallel.DataParallel, emit: Callable[[dict], None],
                 should_stop: Callable[[], Optional[str]]):
        self.plan, self.dp, self.emit, self.should_stop = plan, dp, emit, should_stop
        self.run_dir, self.cfg, self.main = plan.run_dir, plan.config.train, dp.is_main
        self.progress = Progress()
        self.abort: Optional[str] = None  # why an evaluation was abandoned (a signal)
        self.last_loss: Optional[float] = None
        self.pending = None  # the last step's metrics, read one step late so the host never waits

    # -- build or restore the state --

    def build(self) -> None:
        plan, cfg, dp = self.plan, self.cfg, self.dp
        tokens_file = runs.TOKENS_FILE if self.main else f"tokens-p{jax.process_index()}.npy"
        docs_mode = "file" if plan.labelled is not None else plan.config.data.docs  # labelled: documents already split
        encoded = data_mod.encode_corpus(plan.corpus, docs_mode, plan.vocab, self.run_dir / tokens_file)
        self.fingerprint = encoded.sha256
        train_stream, self.val_stream = batches_mod.split_train_val(encoded.stream, plan.config.data.val_frac)
        self.batches = batches_mod.StreamBatches(train_stream, cfg.batch_size, cfg.seq_len)
        # A labelled run: the label of every token beside tokens.npy, read in the same layout.
        self.label_vocab = self.label_batches = self.val_labels = None
        if plan.labelled is not None:
            label_stream = plan.labelled.stream()
            if self.main:
                labels_mod.save_stream(self.run_dir / labels_mod.STREAM_FILE, label_stream)
            train_labels, self.val_labels = batches_mod.split_train_val(label_stream, plan.config.data.val_frac)
            self.label_batches = batches_mod.StreamBatches(train_labels, cfg.batch_size, cfg.seq_len)
            self.label_vocab = plan.labelled.vocab(len(train_stream))
        num_labels = self.label_vocab.size if self.label_vocab is not None else 0
        self.schedule = lr_schedule(cfg, plan.end_step)
        optimizer = make_optimizer(cfg, self.schedule)
        self.keys = run_keys(cfg.seed)
        self.model = build_model(plan.config.model, plan.vocab.size, self.keys["init"], num_labels)
        if plan.source is not None:
            fresh = split_model(self.model)[1]
            nnx.update(self.model, nnx.State(ckpt.transplant(plan.source.params, fresh, plan.source.vocab.size)))
        self.graphdef, state = init_state(self.model, optimizer, cfg.seed)
        carry = self.model.initial_carry(cfg.batch_size)
        if plan.resume:
            state, carry = self._restore(state, carry)
        if self.main:
            runs.write_run_files(self.run_dir, plan.config, plan.vocab)
            if self.label_vocab is not None:
                labels_mod.write_vocab(self.run_dir, self.label_vocab)
        self.state = dp.replicate(state)
        self.carry = dp.shard_rows(dp.local_part(carry))
        self.step = int(state.step)
        self.step_fn = make_train_step(self.graphdef, optimizer, cfg, labelled=num_labels > 0)
        # Parameters ride in the sampler's carry so one compiled sampler serves every step.
        self.sample_fns = (sample_mod.make_sampler(sample_mod.model_step_fn(self.graphdef, labelled=num_labels > 0))
                           if cfg.sample_every else None)
        self.eval_fn = make_eval_fn(self.graphdef, cfg.dtype, num_labels)
        self.have_val = len(self.val_stream) >= 2
        # A resumed run's starting point is already evaluated and saved: never rewrite it.
        self.evaluated_at = self.saved_at = self.step if plan.resume else None
        self.emit({"event": "start", "run_dir": str(self.run_dir), "step": self.step, "total_steps": plan.end_step,
                   "steps_per_epoch": self.batches.steps_per_epoch, "chars_per_step": self.batches.chars_per_step,
                   "train_chars": len(train_stream), "val_chars": len(self.val_stream),
                   "vocab_size": plan.vocab.size, "devices": jax.device_count(),
                   "platform": jax.devices()[0].platform,
                   "params": sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.params))})

    def _restore(self, state: TrainState, carry):
        if ckpt.read_pointer(self.run_dir, "latest") is None:
            # Killed before its first checkpoint: nothing to continue, so start from step 0.
            log.warning("%s has no checkpoint yet; starting from step 0", self.run_dir)
            if self.main:
                runs.truncate_metrics(self.run_dir, 0)
            return state, carry
        state, carry, meta = ckpt.load_train_state(self.run_dir, state, carry)
        self.progress = Progress.from_meta(meta)
        if meta.get("corpus_sha256") != self.fingerprint:
            log.warning("the corpus differs from the one this run was trained on; continuing anyway")
        if self.main:
            runs.truncate_metrics(self.run_dir, meta["step"])
        return state, carry

    # -- the step loop --

    def run(self) -> str:
        """Train until a limit, ``patience`` or a stop request; returns the reason."""
        cfg = self.cfg
        self.t_start = self.t_log = time.monotonic()
        self.step_log = self.step
        if self.plan.source is not None and self.have_val:
            self.evaluate()  # where fine-tuning starts from, on the new corpus
        deadline = self.t_start + cfg.minutes * 60 if cfg.minutes else None
        while True:
            reason = self._stop_reason(deadline)
            if reason:
                return reason
            self._train_step()
            if (self.step % cfg.eval_every == 0 or self.step % cfg.checkpoint_every == 0
                    or (self.sample_fns is not None and self.step % cfg.sample_every == 0)):
                self._flush()
                reason = self._at_boundary()
                if reason:
                    return reason

    def _stop_reason(self, deadline: Optional[float]) -> Optional[str]:
        end, cfg = self.plan.end_step, self.cfg
        if end is not None and self.step >= end:
            return "steps" if cfg.max_steps is not None and self.step >= cfg.max_steps else "epochs"
        reason = self.abort or ("minutes" if deadline is not None and time.monotonic() >= deadline
                                else self.should_stop())
        # Every process must agree to stop at the same step (a signal may reach only one).
        if self.dp.any(bool(reason)):
            return reason or "stopped by another process"
        return None

    def _train_step(self) -> None:
        parts = self.batches.batch(self.step, self.dp.local_rows)
        if self.label_batches is not None:  # each input's label
            parts += self.label_batches.batch(self.step, self.dp.local_rows)[:1]
        parts = self.dp.shard_rows(parts)
        reset = np.bool_(self.batches.starts_epoch(self.step))
        self.state, self.carry, metrics = self.step_fn(self.state, self.carry, (*parts[:2], reset, *parts[2:]))
        self.step += 1
        self._flush()
        self.pending = (self.step, metrics)

    def _flush(self) -> None:
        if self.pending is not None:
            self._absorb(*self.pending)
            self.pending = None

    def _absorb(self, s: int, metrics) -> None:
        """Count, log and report one finished step (its metrics read back from the device)."""
        m, p, cfg = jax.device_get(metrics), self.progress, self.cfg
        if not m["ok"]:
            p.bad_in_a_row += 1
            p.bad_total += 1
            self.emit({"event": "bad_step", "step": s, "in_a_row": p.bad_in_a_row})
            if p.bad_in_a_row >= cfg.max_bad_steps:
                raise CharrnnError(
                    f"training stopped at step {s}: {p.bad_in_a_row} steps in a row had a non-finite "
                    f"loss, gradient or parameters; {self._kept()} (try a lower --lr or --grad-clip)")
            return
        p.bad_in_a_row = 0
        self.last_loss = float(m["loss"])
        p.log_losses.append(self.last_loss)
        self.emit({"event": "step", "step": s, "loss": self.last_loss})
        if s % cfg.log_every == 0:
            now = time.monotonic()
            loss = float(np.mean(p.log_losses))
            chars = self.batches.chars_per_step
            record = {"event": "train", "step": s, "chars": s * chars, "loss": loss,
                      "bits": loss / math.log(2), "lr": float(self.schedule(s)),
                      "chars_per_s": round((s - self.step_log) * chars / max(now - self.t_log, 1e-9), 1),
                      "elapsed_s": round(now - self.t_start, 3)}
            self._record(record)
            p.log_losses.clear()
            self.t_log, self.step_log = now, s

    def _kept(self) -> str:
        latest = ckpt.read_pointer(self.run_dir, "latest") if self.main else None
        return (f"nothing of them was saved; the last good checkpoint, {self.run_dir / latest}, is kept" if latest
                else f"nothing of them was saved (no checkpoint in {self.run_dir})")

    def _record(self, record: dict) -> None:
        if self.main:
            runs.append_metrics(self.run_dir, record)
        self.emit(record)

    # -- evaluation and checkpoints --

    def _at_boundary(self) -> Optional[str]:
        step, cfg = self.step, self.cfg
        best = False
        if self.have_val and step % cfg.eval_every == 0:
            record = self.evaluate()
            if record is None:
                return None  # abandoned for a stop request: the loop stops next, then saves
            best = record["best"]
            self.evaluated_at = step
        # No checkpoint in the middle of a run of non-finite steps: the last good one stays latest.
        if (step % cfg.checkpoint_every == 0 or best) and self.progress.bad_in_a_row == 0:
            self.save(best)
        if self.sample_fns is not None and step % cfg.sample_every == 0:
            self.show_sample()
        if cfg.patience and self.progress.evals_since_best >= cfg.patience:
            return "patience"
        return None

    def evaluate(self) -> Optional[dict]:
        """The validation loss now, recorded; None (and no record) when a stop request came first."""
        p = self.progress
        val = evaluate_stream(self.graphdef, self.dp.local_copy(self.state.params), self.model.initial_carry,
                              self.val_stream, num_streams=self.cfg.batch_size, seq_len=self.cfg.seq_len,
                              eval_fn=self.eval_fn, should_stop=self.should_stop, labels=self.val_labels,
                              num_labels=self.label_vocab.size if self.label_vocab is not None else 0)
        if self.dp.any(val is None):
            self.abort = self.should_stop() or "stopped by another process"
            return None
        if val["chars"] and not math.isfinite(val["nats"]):
            raise CharrnnError(f"training stopped at step {self.step}: the validation loss is not finite "
                               f"(the parameters overflow); {self._kept()} (try a lower --lr or --grad-clip)")
        improved = math.isfinite(val["nats"]) and (p.best_val is None or val["nats"] < p.best_val)
        if improved:
            p.best_val, p.best_step, p.evals_since_best = val["nats"], self.step, 0
        else:
            p.evals_since_best += 1
        by_label = val.pop("by_label", None)
        if math.isfinite(val["nats"]):
            p.last_val = val
        record = {"event": "eval", "step": self.step, "chars": self.step * self.batches.chars_per_step,
                  "val_loss": val["nats"], "val_bits": val["bits"], "best": improved,
                  "elapsed_s": round(time.monotonic() - self.t_start, 3)}
        if by_label is not None:  # each label's validation loss beside the overall one
            record["val_loss_by_label"] = {n: d["nats"] for n, d in zip(self.label_vocab.names, by_label)
                                           if d["chars"]}
        self._record(record)
        return record

    def show_sample(self) -> None:
        controls = sample_mod.make_controls(self.plan.vocab.size, 1.0)
        prompt = sample_mod.prompt_tokens(np.zeros(0, np.int32), 1)
        params = self.dp.local_copy(self.state.params)
        state, extra = self.model.initial_carry(1), {}
        if self.label_vocab is not None:  # the same label at every sample: the most frequent one
            label = self.label_vocab.most_frequent
            weights = np.eye(self.label_vocab.size, dtype=np.float32)[[label]]
            state = (nnx.merge(self.graphdef, params).label_term(weights), state)
            extra = {"label": self.label_vocab.names[label]}
        toks = np.concatenate(list(sample_mod.generate_stream(
            *self.sample_fns, (params, state), prompt,
            self.keys["sample"], controls, self.cfg.sample_length)), axis=1)[0]
        text = self.plan.vocab.decode(sample_mod.cut_at_end(toks)[0])
        self._record({"event": "sample", "step": self.step, "text": text, **extra})

    def save(self, best: bool) -> None:
        """Commit the state as checkpoint ``ckpt-<step>``, move ``latest`` (and ``best``) to it."""
        step, batches = self.step, self.batches
        epoch, window = batches.position(step)
        meta = {"step": step, "epoch": epoch, "window": window, "chars_seen": step * batches.chars_per_step,
                "corpus_sha256": self.fingerprint, **self.progress.to_meta()}
        tensors = self.dp.to_host(ckpt.train_state_tensors(self.state, self.carry))  # every process joins
        self.saved_at = step
        if not self.main:
            return
        path = ckpt.write_checkpoint(self.run_dir, step, tensors, meta)
        ckpt.set_pointer(self.run_dir, "latest", path.name)
        ckpt.fault_point("save-pointer-moved")
        if best:
            ckpt.set_pointer(self.run_dir, "best", path.name)
        runs.discard_replaced(self.run_dir)  # the new run is committed: the run it replaced can go
        ckpt.prune(self.run_dir, self.cfg.keep)
        self.emit({"event": "save", "step": step, "path": str(path), "best": best})

    # -- stopping --

    def finish(self, reason: str) -> TrainResult:
        """The last evaluation and checkpoint (none of a non-finite state), and the result."""
        self._flush()
        p, step = self.progress, self.step
        best = False
        if self.have_val and self.evaluated_at != step and reason in NATURAL_ENDS:
            record = self.evaluate()
            if record is None:
                reason = self.abort
            else:
                best = record["best"]
        if p.bad_in_a_row:
            raise CharrnnError(f"training ended at step {step} after {p.bad_in_a_row} step(s) in a row with a "
                               f"non-finite loss, gradient or parameters; {self._kept()} "
                               f"(try a lower --lr or --grad-clip)")
        if self.saved_at != step or best:
            self.save(best or not self.have_val)
        self.emit({"event": "end", "step": step, "reason": reason, "best_val": p.best_val})
        return TrainResult(run_dir=self.run_dir, step=step, stop_reason=reason, last_val=p.last_val,
                           best_val=p.best_val, train_loss=self.last_loss)


def train(corpus, config: Optional[RunConfig] = None, out: Optional[Path] = None, *, resume: bool = False,
          overwrite: bool = False, init_from: Optional[Path] = None, on_event: Optional[Callable[[dict], None]] = None,
          should_stop: Optional[Callable[[], Optional[str]]] = None) -> TrainResult:
    """Train a model on ``corpus`` and write the run directory.

    Args:
        corpus: a path, a corpus name (see ``charrnn.data.load_corpus``) or a loaded ``Corpus``.
        config: the run's configuration; with ``resume`` and None, the run's saved one.
        out: the run directory (default ``checkpoints/<corpus name>``): missing, empty, or (with
            ``resume`` or ``overwrite``) a charrnn run; a directory holding anything else is refused.
        resume: continue the run in ``out`` from its latest checkpoint, exactly as if it had
            not stopped. Model, data and batch layout settings must match the run's.
        overwrite: start afresh in ``out`` even if it holds a run. The old run is kept aside
            until the new one commits its first checkpoint, and restored if it never does.
        init_from: a run directory to fine-tune from: its weights are copied, characters it
            knows keep their ids, new ones are appended with fresh rows; the optimizer starts
            fresh. Its architecture (cell, layers, hidden) is used.
        on_event: called with progress events (dicts with an ``"event"`` key: ``start``,
            ``step``, ``log``, ``eval``, ``save``, ``end``); the CLI draws its progress bar from
            them. The library never prints.
        should_stop: polled once per step and between evaluation chunks; a non-None return (a
            reason such as ``"SIGINT"``) ends training after the current step with a checkpoint.

    Returns:
        A ``TrainResult``.

    One process at a time trains a run: it holds the run directory's lock (``runs.RunLock``)
    throughout. It changes nothing process-wide (environment, malloc, signal handlers): the
    process tuning ``charrnn train`` applies is in ``charrnn.runtime``.

    Raises:
        CharrnnError: for unusable input or settings, with a message for the user; also when
            training ends in non-finite steps (nothing of them is saved).
    """
    path_types = (str, os.PathLike)
    check_argument("train", "corpus", corpus, (*path_types, data_mod.Corpus))
    check_argument("train", "config", config, (RunConfig,), optional=True)
    check_argument("train", "out", out, path_types, optional=True)
    check_argument("train", "init_from", init_from, path_types, optional=True)
    emit = on_event or (lambda e: None)
    plan = plan_run(corpus, config, out, resume=resume, overwrite=overwrite, init_from=init_from)
    dp = parallel.DataParallel(plan.config.train.batch_size)
    # Only the first process reports.
    trainer = Trainer(plan, dp, emit if dp.is_main else (lambda e: None), should_stop or (lambda: None))
    with claim_run_dir(plan, dp.is_main):
        trainer.build()
        return trainer.finish(trainer.run())

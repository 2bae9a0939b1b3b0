"""A trained run loaded for use (``charrnn.load``): ``Run``, a facade over the modules that do the work."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from charrnn import beam as beam_mod
from charrnn import checkpoint as ckpt
from charrnn import data as data_mod
from charrnn import evaluate as evaluate_mod
from charrnn import labels as labels_mod
from charrnn import parallel
from charrnn import runs
from charrnn import sample as sampler
from charrnn.beam import BeamResult
from charrnn.config import RunConfig, SampleConfig, check_argument
from charrnn.errors import CharrnnError
from charrnn.evaluate import compute_dtype, make_eval_fn
from charrnn.model import abstract_model, count_params, split_model
from charrnn.vocab import Vocab, describe_chars

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """One generated text (prime included) and why it ended: ``finish`` is ``"end"`` (the end
    token), ``"stop"`` (a stop string, not included) or ``"length"`` (the length limit);
    ``ended`` is ``finish != "length"``. ``label``: what a labelled run's sample was written
    in (a label, or the ``--label`` mix asked for); None for an unlabelled run."""

    text: str
    ended: bool
    finish: str = "length"
    label: Optional[str] = None


class Run:
    """A run directory's model at one checkpoint: a facade over the parts that do the work.

    Sampling (``sample``, ``stream``) runs ``charrnn.sample``'s compiled sampler, each row's text
    kept by ``sample.RowText``; ``beam_search`` is ``beam.beam_search``; ``evaluate`` and
    ``evaluate_labelled`` are ``charrnn.evaluate``'s; ``training_documents`` is
    ``data.training_documents``. What stays here is what they share: the parameters, the
    compiled programs kept between calls, and the run's checks of its inputs.

    Attributes:
        config: the run's ``RunConfig``.
        vocab: its ``Vocab``.
        checkpoint: the checkpoint directory the parameters came from.
        meta: that checkpoint's metadata (step, losses, data position).
        labels: a labelled run's ``charrnn.labels.LabelVocab`` (None for an unlabelled run).
    """

    def __init__(self, run_dir: Path, config: RunConfig, vocab: Vocab, checkpoint: Path, params, meta: dict,
                 model=None, labels: Optional[labels_mod.LabelVocab] = None):
        self.run_dir = run_dir
        self.config = config
        self.vocab = vocab
        self.labels = labels
        self.checkpoint = checkpoint
        self.meta = meta
        self.params = params
        # ``model``: the shape-only model where the caller already built it (``load`` does:
        # tracing it costs ~0.1 s before the first character).
        self.model = model if model is not None else abstract_model(config.model, vocab.size,
                                                                    labels.size if labels else 0)
        self.graphdef, _ = nnx.split(self.model)
        self._dtype = compute_dtype("float32")
        self._step_fn = sampler.model_step_fn(self.graphdef, self._dtype, labelled=labels is not None)
        self._samplers = {}  # (device count, penalties) -> (prime, generate, replicated params)
        self._eval_fn = None
        self.last_labels: list = []  # each sample's label in the last ``sample``/``stream`` call

    @property
    def step(self) -> int:
        return int(self.meta.get("step", 0))

    @property
    def num_params(self) -> int:
        return count_params(self.params)

    # --- the sampler's pieces (``charrnn.serve`` uses them too) ------------------------------

    def sampling_devices(self, num_samples: int) -> int:
        """How many of this process's CPU devices ``stream`` splits ``num_samples`` rows over.

        More than one only where JAX has several CPU devices (``charrnn sample`` makes them with
        ``runtime.use_cpu_devices`` when this rule, ``parallel.sampling_devices``, says so).
        """
        devices = jax.local_devices()
        if len(devices) < 2 or devices[0].platform != "cpu":
            return 1
        return parallel.sampling_devices_for(self.config.model, self.vocab.size, num_samples, cores=len(devices))

    def _sampler_fns(self, devices: int = 1, penalties: bool = False):
        """``(prime, generate, params)`` of the sampler for ``devices`` devices, built once each
        (``penalties``: the program that counts characters; without, exactly the plain one)."""
        if (devices, penalties) not in self._samplers:
            mesh = parallel.local_mesh(devices) if devices > 1 else None
            prime, generate = sampler.make_sampler(self._step_fn, mesh=mesh, penalties=penalties)
            params = self.params if mesh is None else jax.device_put(self.params, NamedSharding(mesh, P()))
            self._samplers[devices, penalties] = (prime, generate, params)
        return self._samplers[devices, penalties]

    def _zero_carry(self, rows: int):
        """The model's initial carry for ``rows`` rows as numpy zeros (``initial_carry``'s
        eager ``jnp.zeros`` would compile a small program per shape before the first character)."""
        shapes = jax.eval_shape(lambda: self.model.initial_carry(rows))
        return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)

    def _start_state(self, rows: int, label_weights_NxL=None):
        """The sampler's per-row state: zeros, and for a labelled run each row's label term
        (``CharRNN.label_term`` of its label mix) beside them."""
        if self.labels is None:
            return self._zero_carry(rows)
        term = nnx.merge(self.graphdef, self.params).label_term(np.asarray(label_weights_NxL, np.float32))
        return np.asarray(term), self._zero_carry(rows)

    def label_table(self) -> Optional[np.ndarray]:
        """``(num_labels, G)`` float32: each label's whole term in the first layer's gates
        (``CharRNN.label_table``, what ``--label`` adds; the exports carry it); None for an
        unlabelled run."""
        if self.labels is None:
            return None
        return np.asarray(nnx.merge(self.graphdef, self.params).label_table(), np.float32)

    # --- checks of the inputs ------------------------------------------------------------------

    def sample_labels(self, label: Optional[str], rows: int, seed: Optional[int]):
        """``(label_weights_NxL, names)`` of ``rows`` samples (``labels.row_labels``): ``label``
        for every row, or on a labelled run without one a label per row drawn in the training
        proportions; ``CharrnnError`` for an unknown label, naming the known ones."""
        return labels_mod.row_labels(self.labels, label, rows, seed)

    def check_prime(self, prime: str) -> np.ndarray:
        """Ids of the prime text; ``CharrnnError`` naming any character the model never saw."""
        missing = self.vocab.unknown(prime)
        if missing:
            raise CharrnnError(f"--prime has {len(missing)} character(s) not in the vocabulary: "
                               f"{describe_chars(missing)}")
        return self.vocab.encode(prime)

    # --- sampling ------------------------------------------------------------------------------

    def stream(self, config: SampleConfig = SampleConfig()) -> Iterator[tuple[list[str], np.ndarray]]:
        """Generate ``config.num_samples`` samples at once, chunk by chunk.

        Yields ``(pieces, ended_N)``: each sample's new text in this chunk (the first chunk is
        the prime text itself) and which samples have finished so far. A sample finishes at the
        end token, before a stop string or after ``config.length`` generated characters; the
        pieces concatenate to ``sample``'s texts. Sample i draws from
        ``fold_in(prng.key_from_seed(seed), i)``: its text does not depend on ``num_samples``.
        """
        for pieces, finish in self._stream(config):
            yield pieces, np.array([f is not None for f in finish], bool)

    def _stream(self, config: SampleConfig) -> Iterator[tuple[list[str], list[Optional[str]]]]:
        """``stream``'s pieces with each sample's finish reason (``None`` while it runs)."""
        n = config.num_samples
        prime_ids = self.check_prime(config.prime)
        seed = config.seed if config.seed is not None else int.from_bytes(os.urandom(8), "little")
        label_weights, self.last_labels = self.sample_labels(config.label, n, seed)
        devices = self.sampling_devices(n)
        log.info("sampling %d rows on %d device(s)", n, devices)
        prime, generate, params = self._sampler_fns(devices, config.penalties)
        controls = sampler.make_controls(self.vocab.size, config.temperature, config.top_k, config.top_p,
                                         config.greedy, config.presence_penalty, config.frequency_penalty,
                                         config.repetition_penalty, rows=n)
        prompt = sampler.prompt_tokens(prime_ids, n)
        counts = sampler.prompt_counts(prompt, self.vocab.size) if config.penalties and config.penalize_prime else None
        carry = (params, self._start_state(n, label_weights))
        rows = [sampler.RowText(self.vocab.decode, config.length, config.stop) for _ in range(n)]
        yield [config.prime] * n, [None] * n
        for toks_NxC in sampler.generate_stream(prime, generate, carry, prompt, sampler.row_keys(seed, n),
                                                controls, config.length, counts):
            pieces, finish = zip(*(row.feed(toks_C) for row, toks_C in zip(rows, toks_NxC)))
            yield list(pieces), list(finish)
            if all(row.finished for row in rows):
                break  # every row ended, stopped or reached the length: no more chunks

    def sample(self, config: Optional[SampleConfig] = None, **overrides) -> list[Sample]:
        """Generate samples; ``overrides`` are ``SampleConfig`` fields (``length=200, prime="A"``)."""
        config = config or SampleConfig(**overrides)
        texts = ["" for _ in range(config.num_samples)]
        finish: list[Optional[str]] = [None] * config.num_samples
        for pieces, finish in self._stream(config):
            texts = [t + p for t, p in zip(texts, pieces)]
        return [Sample(t, f is not None and f != "length", f or "length", label)
                for t, f, label in zip(texts, finish, self.last_labels)]

    def beam_search(self, prime: str = "", beam: int = 5, length: int = 100,
                    length_penalty: float = 0.0, label: Optional[str] = None) -> list[BeamResult]:
        """The ``beam`` most probable continuations of ``prime``, best first (``beam.beam_search``).

        Ranked by total log-probability divided by ``generated_length ** length_penalty``
        (0: no normalisation). Each stops at the end token or after ``length`` characters.
        ``label``: a labelled run's label or mix (default: its most frequent training label).
        """
        beam_mod.check_search(beam, length)
        prime_ids = self.check_prime(prime)
        if self.labels is not None and label is None:
            label = self.labels.names[self.labels.most_frequent]
        weights, _ = self.sample_labels(label, 1, 0)
        return beam_mod.beam_search(self._sampler_fns()[0], self._step_fn, (self.params, self._start_state(1, weights)),
                                    sampler.prompt_tokens(prime_ids, 1), beam=beam, length=length,
                                    length_penalty=length_penalty, decode=self.vocab.decode, prime=prime)

    # --- novelty and evaluation ------------------------------------------------------------------

    def training_documents(self) -> set[str]:
        """The documents of the run's training split, read again from its corpus (for novelty)."""
        data = self.config.data
        try:
            corpus = data_mod.load_corpus(self.config.corpus, data.encoding)
        except CharrnnError as e:
            raise CharrnnError(f"cannot read the run's corpus to check novelty: {e}") from None
        return data_mod.training_documents(corpus, data.docs, data.val_frac)

    def evaluate(self, text: str) -> dict:
        """Loss of the model on ``text``, split into documents as the run was trained
        (``evaluate.evaluate_text``).

        Returns:
            ``{"nats": ..., "bits": ..., "chars": scored characters, "perplexity": ...}``.
        """
        return evaluate_mod.evaluate_text(self, text, self._evaluator())

    def evaluate_labelled(self, path) -> dict:
        """Loss of a labelled run's model on the labelled text at ``path`` (a file or directory
        in the run's ``--labels`` format, split into documents as the run was trained): as
        ``evaluate``, plus ``"labels"``: ``{label: {"nats", "bits", "chars", "perplexity"}}``
        for every label of the run that the text has (``evaluate.evaluate_labelled``)."""
        return evaluate_mod.evaluate_labelled(self, path, self._evaluator())

    def _evaluator(self):
        """The run's loss program (``evaluate.make_eval_fn``), built once: later calls reuse its compilations."""
        if self._eval_fn is None:
            self._eval_fn = make_eval_fn(self.graphdef, num_labels=self.labels.size if self.labels else 0)
        return self._eval_fn


def load(run, checkpoint: str = "best") -> Run:
    """Load a run directory (or one checkpoint directory inside it) for sampling and evaluation.

    Args:
        run: the run directory written by ``charrnn train``.
        checkpoint: ``best`` (lowest validation loss; ``latest`` when there is none) or ``latest``.

    Raises:
        CheckpointError: when anything in the run is missing, altered or inconsistent.
    """
    check_argument("load", "run", run, (str, os.PathLike))
    if checkpoint not in ckpt.POINTERS:
        raise CharrnnError(f"--checkpoint must be best or latest, not {checkpoint!r}")
    path = Path(run)
    run_dir = ckpt.resolve(path, checkpoint).parent
    config, vocab = runs.read_run_files(run_dir)
    labels = labels_mod.read_vocab(run_dir, config)
    model = abstract_model(config.model, vocab.size, labels.size if labels else 0)
    _, params_template = split_model(model)
    ck_dir, params, meta = ckpt.read_params(path, checkpoint, params_template)
    # device_put, not jnp.asarray: the latter compiles an XLA copy per array shape (~10 ms each).
    params = jax.tree_util.tree_map(jax.device_put, params)
    return Run(run_dir, config, vocab, ck_dir, params, meta, model=model, labels=labels)

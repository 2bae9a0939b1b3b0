"""The ``charrnn`` command line: parses, builds configs, calls the library, prints."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, Optional

from charrnn import runtime

if runtime.launched_as_command():
    # The charrnn command's own process: Ctrl-C and SIGTERM are handled from here on, before
    # the heavier imports (a user's script importing this module keeps its own handlers).
    runtime.install_signal_handling()

import click  # noqa: E402

from charrnn.config import DataConfig, ModelConfig, RunConfig, SampleConfig, TrainConfig  # noqa: E402
from charrnn.errors import CharrnnError  # noqa: E402

EXIT_ERROR, EXIT_USAGE = 1, 2
SIGNAL_EXIT = {"SIGINT": 130, "SIGTERM": 143}


def _fail(message: str, code: int = EXIT_ERROR):
    click.echo(f"charrnn: error: {message}", err=True)
    sys.exit(code)


class CharrnnGroup(click.Group):
    """A click group whose every error is one ``charrnn: error:`` line (``--debug`` shows tracebacks)."""

    def main(self, args=None, prog_name=None, **extra):
        args = list(sys.argv[1:] if args is None else args)
        debug = "--debug" in args or os.environ.get("CHARRNN_DEBUG") == "1"
        watcher = runtime.signal_watcher()
        if watcher is not None:
            watcher.unwind = True  # from here a signal unwinds the main thread into the handlers below
        try:
            rv = super().main(args=args, prog_name=prog_name or "charrnn", standalone_mode=False, **extra)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.exceptions.Abort as e:  # click turns a KeyboardInterrupt into Abort
            cause = e.__cause__
            _fail(f"{getattr(cause, 'signal_name', 'SIGINT')} received; stopped" if cause else "aborted",
                  getattr(cause, "exit_code", 130))
        except click.ClickException as e:
            if debug:
                traceback.print_exc()
            _fail(e.format_message(), EXIT_USAGE if isinstance(e, click.UsageError) else EXIT_ERROR)
        except CharrnnError as e:
            if debug:
                traceback.print_exc()
            _fail(str(e))
        except KeyboardInterrupt as e:  # Ctrl-C, or runtime.Interrupted (SIGINT / SIGTERM)
            _fail(f"{getattr(e, 'signal_name', 'SIGINT')} received; stopped", getattr(e, "exit_code", 130))
        except Exception as e:  # a bug: still one line, the traceback on request
            if debug:
                traceback.print_exc()
            _fail(f"internal error: {type(e).__name__}: {e} (run with --debug for the traceback)")
        sys.exit(rv if isinstance(rv, int) else 0)


def _setup_jax() -> None:
    """Persist XLA's compilation cache so a second ``charrnn sample`` starts in a second or two
    (``runtime.use_compile_cache``). Commands call it after their arguments are checked."""
    from charrnn import runtime

    runtime.use_compile_cache()


@click.group(cls=CharrnnGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.option("-v", "--verbose", is_flag=True, help="Log what the library is doing.")
@click.version_option(package_name="charrnn")
def cli(debug: bool, verbose: bool) -> None:
    """Character-level recurrent networks: train on text, sample in its style."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="charrnn: %(message)s")
    for noisy in ("jax", "absl", "flax", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose else logging.ERROR)


# --- options generated from the config dataclasses ----------------------------------------

HELP = {
    "cell": "Recurrent cell: rnn (tanh), lstm or gru.", "layers": "Stacked layers.",
    "hidden": "Hidden units per layer.", "dropout": "Dropout between layers (training only).",
    "docs": "Documents: file (whole file), line (each non-empty line), paragraph (blank-line separated).",
    "encoding": "Codec of the corpus files.", "val_frac": "Last fraction of the text held out for validation.",
    "labels": ("Labelled documents, one model for many styles: tsv (CORPUS is a file of label<TAB>text "
               "lines, \\n \\t \\\\ escapes) or dirs (CORPUS holds one sub-directory per label); none."),
    "label_dim": "Width of each label's learned vector (labelled runs).",
    "batch_size": "Parallel streams per batch (global, over all devices).",
    "seq_len": "Characters per stream per step (truncated BPTT length).",
    "optimizer": "adam, adamw, rmsprop or sgd (momentum 0.9).", "lr": "Peak learning rate.",
    "lr_schedule": "constant, cosine (to lr/10) or exponential (to lr/10).",
    "warmup_steps": "Linear warm-up steps.", "grad_clip": "Clip gradients to this global norm (0: off).",
    "weight_decay": "Decoupled weight decay (adamw only).", "max_steps": "Stop after this many steps.",
    "epochs": "Stop after this many passes over the training text.",
    "minutes": "Stop after this many minutes of training.",
    "eval_every": "Compute the full validation loss every N steps (and keep the best checkpoint).",
    "save_every": "Write a checkpoint every N steps (default: at each evaluation).",
    "patience": "Stop after K evaluations without improvement.",
    "keep": "Checkpoints to keep besides the best.", "seed": "Seed for initialisation, dropout and sampling.",
    "dtype": ("Matmul precision: float32, or bfloat16 (float32 master weights and loss; on CPUs "
              "with AMX, charrnn's own tile kernel runs the matmuls: CHARRNN_AMX=0 turns it off)."),
    "max_bad_steps": "Stop after this many non-finite steps in a row.",
    "log_every": "Record the train loss in metrics.jsonl every N steps.",
    "sample_every": "Show a short sample every N steps (0: never).",
    "sample_length": "Length of those samples.",
}
TRAIN_SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
MAX_PROCESSES = 1 << 16
MAX_CPU_DEVICES = 1024
NOMINAL_VOCAB = 2 + 95  # the special tokens and printable ASCII
MODEL_OPTIONS = ("cell", "layers", "hidden")
_HOST_PORT = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):([0-9]{1,5})$")


def _click_type(f: dataclasses.Field):
    t = str(f.type)
    if "int" in t:
        return int
    if "float" in t:
        return float
    return str


def _config_options(fn):
    for klass in reversed(list(TRAIN_SECTIONS.values())):
        for f in reversed(dataclasses.fields(klass)):
            opt = "--" + f.name.replace("_", "-")
            default = f.default if f.default is not dataclasses.MISSING else None
            shown = f" [default: {default}]" if default is not None else ""
            fn = click.option(opt, f.name, type=_click_type(f), default=None, help=HELP.get(f.name, "") + shown)(fn)
    return fn


def build_run_config(options: dict[str, Any], base: Optional[RunConfig] = None) -> RunConfig:
    """A ``RunConfig`` from ``base`` (or the defaults) with every option the user gave applied."""
    base = base or RunConfig()
    sections = {}
    for name, klass in TRAIN_SECTIONS.items():
        given = {f.name: options[f.name] for f in dataclasses.fields(klass) if options.get(f.name) is not None}
        sections[name] = dataclasses.replace(getattr(base, name), **given)
    return dataclasses.replace(base, **sections)


class SignalStop:
    """SIGINT/SIGTERM set a flag the training loop polls; a second SIGINT exits at once.

    Under the ``charrnn`` entry point the process's ``runtime.SignalWatcher`` does the work:
    until the loop polls a second time (nothing trained yet, nothing to save) a signal ends the
    process at once; from then on it only sets the flag. Elsewhere (``cli.main()`` from a script, a
    test runner) Python-level handlers set the flag for the block's duration.
    """

    def __init__(self):
        self._reason: Optional[str] = None
        self._old = {}
        self._watcher = None
        self._polls = 0

    def __enter__(self):
        from charrnn import runtime

        self._watcher = runtime.signal_watcher()
        if self._watcher is None:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self._reason is not None and name == "SIGINT":
            # The last committed checkpoint is intact: commits are atomic renames.
            os.write(2, b"\ncharrnn: interrupted again; exiting now (the last checkpoint is intact)\n")
            os._exit(130)
        self._reason = name
        os.write(2, f"\ncharrnn: {name} received; finishing this step and saving a checkpoint "
                    f"(Ctrl-C again to quit at once)\n".encode())

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        if self._watcher is not None:
            self._watcher.cooperative = False  # after the loop: a signal ends the process again
        return False

    @property
    def reason(self) -> Optional[str]:
        return self._watcher.reason if self._watcher is not None else self._reason

    def __call__(self) -> Optional[str]:
        self._polls += 1
        if self._watcher is not None and self._polls >= 2:
            # The loop polls again: a step has run since the first poll (the one that compiled
            # the step function: seconds in C, with nothing yet worth saving), so from now on a
            # signal lets it finish its step and save.
            self._watcher.cooperative = True
        return self.reason


def _devices_text(e: dict) -> str:
    n, platform = e.get("devices", 1), e.get("platform", "cpu")
    name = platform.upper() if platform in ("gpu", "tpu", "cpu") else platform
    return f"{n} {name} device{'s' if n != 1 else ''}"


class TrainProgress:
    """Turns the library's training events into a tqdm bar and a few printed lines."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar = None
        self.val = None
        self.rate = None
        self.loss = None

    def __call__(self, e: dict) -> None:
        from tqdm.auto import tqdm

        kind = e["event"]
        if kind == "start":
            if not self.quiet:
                click.echo(f"training on {e['train_chars']:,} chars ({e['val_chars']:,} for validation), "
                           f"vocabulary {e['vocab_size']}, {e['params']:,} parameters, "
                           f"{_devices_text(e)} -> {e['run_dir']}", err=True)
            self.bar = tqdm(total=e["total_steps"], initial=e["step"], unit="step", dynamic_ncols=True,
                            disable=self.quiet, mininterval=0.5, file=sys.stderr)
        elif kind == "step":
            self.loss = e["loss"]
            self.bar.update(e["step"] - self.bar.n)
            self._postfix()
        elif kind == "train":
            self.rate = e["chars_per_s"]
        elif kind == "eval":
            self.val = e["val_loss"]
            self._postfix()
            self.bar.write(f"step {e['step']}: val loss {e['val_loss']:.4f} nats/char "
                           f"({e['val_bits']:.4f} bits/char){'  *best*' if e['best'] else ''}", file=sys.stderr) \
                if not self.quiet else None
        elif kind == "sample":
            if not self.quiet:
                self.bar.write(f"--- sample at step {e['step']} ---\n{e['text']}\n---", file=sys.stderr)
        elif kind == "bad_step":
            self.bar.write(f"step {e['step']}: non-finite loss or gradient, step skipped "
                           f"({e['in_a_row']} in a row)", file=sys.stderr)
        elif kind == "end":
            self.close()

    def _postfix(self):
        parts = {}
        if self.loss is not None:
            parts["loss"] = f"{self.loss:.3f}"
        if self.val is not None:
            parts["val"] = f"{self.val:.3f}"
        if self.rate is not None:
            parts["chars/s"] = f"{self.rate:,.0f}"
        self.bar.set_postfix(parts, refresh=False)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@cli.command()
@click.argument("corpus")
@click.option("--out", type=click.Path(file_okay=False), help="Run directory [default: checkpoints/<corpus>].")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its latest checkpoint, exactly.")
@click.option("--overwrite", is_flag=True, help="Replace the run in --out if there is one (its files are deleted).")
@click.option("--init-from", type=click.Path(file_okay=False), help="Fine-tune: start from this run's weights.")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Where downloaded corpora are cached.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option("--coordinator", metavar="HOST:PORT", help="Multi-process training: process 0's address.")
@click.option("--num-processes", type=click.IntRange(1, MAX_PROCESSES),
              help="Multi-process training: how many processes.")
@click.option("--process-id", type=click.IntRange(0, MAX_PROCESSES - 1),
              help="Multi-process training: this process's index.")
@click.option("--distributed", is_flag=True, help="Multi-process training, detected from the cluster (SLURM, ...).")
@click.option("--cpu-devices", type=click.IntRange(1, MAX_CPU_DEVICES), default=None,
              help="On CPU, split the machine into N data-parallel devices [default: one per core, "
                   "when the batch divides evenly with at least 8 streams each].")
@click.option("--dry-run", is_flag=True,
              help="Check everything (options, corpus, run directory, memory) and print the plan; write nothing.")
@_config_options
def train(corpus: str, out: Optional[str], resume: bool, overwrite: bool, init_from: Optional[str],
          cache_dir: Optional[str], quiet: bool, coordinator: Optional[str], num_processes: Optional[int],
          process_id: Optional[int], distributed: bool, cpu_devices: Optional[int], dry_run: bool,
          **options) -> int:
    """Train a model on CORPUS: a text file, a directory of text files, or a corpus name.

    Writes config.json, vocab.json, metrics.jsonl and checkpoints into the run directory.
    """
    # Arguments first, then files, then JAX: a mistake costs no start-up and changes nothing.
    _check_train_options(out, resume, init_from, coordinator, num_processes, process_id, distributed, options)
    config = build_run_config(options)
    if cache_dir:
        os.environ["CHARRNN_CACHE"] = cache_dir
    if out:
        _check_writable(Path(out), "--out")
    from charrnn import limits, runtime

    if not resume and not init_from:
        # The vocabulary is not known before the corpus is read: refuse what cannot fit even
        # with a small one (the corpus's own is checked by --dry-run).
        limits.check_fits(config, NOMINAL_VOCAB)
    _check_corpus_named(corpus)
    if resume:
        from charrnn import runs

        saved, vocab = runs.read_run_files(Path(out))
        config = build_run_config(options, saved)
        limits.check_fits(config, vocab.size, where=str(Path(out) / "config.json"))
    if dry_run:
        return _train_plan(corpus, config, out, resume, init_from)
    from charrnn import parallel
    from charrnn.train import train as train_run

    _setup_jax()
    multi_process = coordinator is not None or distributed
    if cpu_devices is None and not multi_process:
        cpu_devices = parallel.auto_cpu_devices(config.train.batch_size)
    if cpu_devices is not None:
        runtime.use_cpu_devices(cpu_devices)  # before anything starts JAX's backends
    runtime.use_training_xla_flags()  # likewise: XLA:CPU's memory-saving schedule, XLA:GPU's deterministic ops
    parallel.initialize(coordinator, num_processes, process_id, auto=distributed)
    runtime.keep_freed_memory()
    import jax

    if jax.process_index() != 0:
        quiet = True

    progress = TrainProgress(quiet)
    try:
        with SignalStop() as stop:
            result = train_run(corpus, config, Path(out) if out else None, resume=resume, overwrite=overwrite,
                               init_from=Path(init_from) if init_from else None,
                               on_event=progress, should_stop=stop)
    finally:
        progress.close()
    # A signal that arrived after the loop's last poll (during the final save) still ends the
    # command with its code: the run is complete, but the user asked it to stop.
    code = SIGNAL_EXIT.get(result.stop_reason) or SIGNAL_EXIT.get(stop.reason, 0)
    if jax.process_index() != 0:
        return code
    val = result.last_val
    summary = f"stopped at step {result.step} ({result.stop_reason})"
    if val:
        summary += f"; val loss {val['nats']:.4f} nats/char ({val['bits']:.4f} bits/char)"
    if result.best_val is not None:
        summary += f"; best {result.best_val:.4f}"
    click.echo(summary, err=True)
    click.echo(f"saved in {result.run_dir}; sample with: charrnn sample {result.run_dir}", err=True)
    return code




def _check_train_options(out, resume, init_from, coordinator, num_processes, process_id, distributed,
                         options) -> None:
    """Refuse contradictory or ignored train options before anything is read or started."""
    if resume and not out:
        raise CharrnnError("--resume needs --out RUN_DIR naming the run to continue")
    if init_from:
        given = [f"--{name}" for name in MODEL_OPTIONS if options.get(name) is not None]
        if given:
            raise CharrnnError(f"{', '.join(given)} cannot be given with --init-from: the model's "
                               f"architecture is the run's it starts from")
    if coordinator is None:
        ignored = [n for n, v in (("--num-processes", num_processes), ("--process-id", process_id)) if v is not None]
        if ignored:
            raise CharrnnError(f"{' and '.join(ignored)} need{'s' if len(ignored) == 1 else ''} --coordinator HOST:PORT"
                               + ("" if not distributed else " (--distributed detects them from the cluster)"))
        return
    if distributed:
        raise CharrnnError("--coordinator and --distributed exclude each other")
    match = _HOST_PORT.match(coordinator)
    if not match or not 1 <= int(match.group(1)) <= 65535:
        raise CharrnnError(f"--coordinator must be HOST:PORT with a port in 1-65535, not {coordinator!r}")
    if num_processes is None or process_id is None:
        raise CharrnnError("--coordinator needs --num-processes and --process-id")
    if process_id >= num_processes:
        raise CharrnnError(f"--process-id must be below --num-processes ({num_processes}), not {process_id}")


def _check_corpus_named(spec: str) -> None:
    """CORPUS is an existing path or a corpus name (its content is read later, by training)."""
    from charrnn import corpora

    if not Path(spec).expanduser().exists() and spec not in corpora.names():
        raise CharrnnError(f"no such file, directory or corpus: {spec} (corpus names: {', '.join(corpora.names())})")


def _check_writable(path: Path, option: str) -> None:
    """``path`` (a directory to be, or one that is) can be written: one clear line if not."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            return
        probe = probe.parent
    if not probe.is_dir():
        raise CharrnnError(f"{option} {path}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CharrnnError(f"{option} {path}: {probe} is not writable")


def _train_plan(corpus: str, config: RunConfig, out: Optional[str], resume: bool, init_from: Optional[str]) -> int:
    """``train --dry-run``: read the corpus (vocabulary, size) and print what training would do."""
    from charrnn import data, limits
    from charrnn.config import check_encoding

    check_encoding(config.data.encoding)
    num_labels = 0
    if config.data.labels != "none":
        from charrnn import labels

        docs = labels.read_labelled(corpus, config.data.labels, config.data.docs, config.data.encoding)
        corp, num_labels = docs.corpus(), len(docs.names)
        vocab, num_tokens = data.corpus_vocab(corp, "file")
    else:
        corp = data.load_corpus(corpus, config.data.encoding)
        vocab, num_tokens = data.corpus_vocab(corp, config.data.docs)
    vocab_size = vocab.size
    if init_from:
        from charrnn import runs

        source, source_vocab = runs.read_run_files(Path(init_from))
        config = dataclasses.replace(config, model=source.model)
        vocab_size = source_vocab.extended(vocab.chars).size
    limits.check_fits(config, vocab_size, num_labels=num_labels)
    plan = {"corpus": corp.name, "files": len(corp.files), "tokens": num_tokens, "vocab_size": vocab_size,
            "labels": num_labels, "params": limits.param_count(config.model, vocab_size, num_labels),
            "step_bytes": limits.step_bytes(config, vocab_size, num_labels=num_labels),
            "run_dir": out or str(Path("checkpoints") / corp.name), "resume": resume,
            "init_from": init_from, "config": config.to_dict()}
    click.echo(json.dumps(plan))
    return 0


@cli.command()
@click.argument("run", type=click.Path())
@click.option("--length", type=int, default=SampleConfig.length, show_default=True,
              help="Characters to generate per sample (fewer if the end token comes first).")
@click.option("--temperature", type=float, default=SampleConfig.temperature, show_default=True,
              help="Divide the logits by this (lower: safer, higher: wilder); finite and > 0 (a tiny one "
                   "acts as --greedy, a huge one as uniform).")
@click.option("--top-k", type=int, default=None, help="Sample only from the K most likely characters.")
@click.option("--top-p", type=float, default=None, help="Sample only from the smallest set with probability P.")
@click.option("--greedy", is_flag=True, help="Always take the most likely character.")
@click.option("--prime", default="", help="Text to start from (printed as part of the sample).")
@click.option("--num-samples", "-n", type=int, default=1, show_default=True, help="Samples generated at once.")
@click.option("--seed", type=int, default=None,
              help="Seed in [0, 2**64) for reproducible samples; sample i does not depend on -n [default: random].")
@click.option("--presence-penalty", type=float, default=SampleConfig.presence_penalty, show_default=True,
              help="Subtract this from a character's logit once it has appeared in the sample (finite; "
                   "OpenAI's meaning; negative encourages repeats).")
@click.option("--frequency-penalty", type=float, default=SampleConfig.frequency_penalty, show_default=True,
              help="Subtract this times a character's count in the sample from its logit (finite; OpenAI's).")
@click.option("--repetition-penalty", type=float, default=SampleConfig.repetition_penalty, show_default=True,
              help="Divide positive logits (multiply negative ones) of characters already in the sample by "
                   "this (CTRL's; > 0, 1 is off, ~1.2 is typical).")
@click.option("--penalize-prime", is_flag=True, help="The penalties also count the --prime text's characters.")
@click.option("--stop", "stops", multiple=True,
              help="End a sample before the first occurrence of TEXT (not printed); repeatable.")
@click.option("--label", default=None,
              help='A labelled run\'s label to write in, or a mix "a=0.7,b=0.3" [default: each sample draws '
                   'one in the training proportions, and says which].')
@click.option("--checkpoint", type=click.Choice(["best", "latest"]), default="best", show_default=True)
@click.option("--json", "as_json", is_flag=True,
              help='One JSON object per sample: {"text": ..., "ended": ..., "finish": "end"|"stop"|"length"}'
                   ' (and "label" for a labelled run).')
@click.option("--beam", type=int, default=None,
              help="Beam search: print the K most probable continuations instead of sampling.")
@click.option("--length-penalty", type=float, default=0.0, show_default=True,
              help="Beam ranking divides the log-probability by length**this.")
@click.option("--mark-novel", is_flag=True,
              help="Mark samples that are not documents of the training data (for --docs line runs).")
@click.option("--show-copies", is_flag=True,
              help="Mark in every sample the longest span found verbatim in the training text "
                   '(--json: "longest_copy": {"start": i, "length": n}).')
@click.option("--min-novel", type=int, default=None,
              help="Re-draw samples that copy N or more characters verbatim from the training text "
                   "(at most 10 rounds; says so if some still do).")
def sample(run: str, length: int, temperature: float, top_k, top_p, greedy: bool, prime: str, num_samples: int,
           seed, presence_penalty: float, frequency_penalty: float, repetition_penalty: float,
           penalize_prime: bool, stops: tuple, label: Optional[str], checkpoint: str, as_json: bool,
           beam: Optional[int], length_penalty: float, mark_novel: bool, show_copies: bool,
           min_novel: Optional[int]) -> None:
    """Generate text from a trained RUN directory."""
    if min_novel is not None and min_novel < 1:
        raise CharrnnError(f"--min-novel must be at least 1, not {min_novel}")
    config = SampleConfig(length=length, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy,
                          prime=prime, num_samples=num_samples, seed=seed, presence_penalty=presence_penalty,
                          frequency_penalty=frequency_penalty, repetition_penalty=repetition_penalty,
                          penalize_prime=penalize_prime, stop=tuple(stops), label=label)
    _check_run_fits(Path(run), checkpoint, rows=num_samples)  # an edited config.json too large for this machine
    _setup_jax()
    if beam is None:
        _split_cpu_for_sampling(Path(run), checkpoint, num_samples)
    from charrnn.inference import load

    model = load(Path(run), checkpoint)
    model.check_prime(prime)
    model.sample_labels(label, 1, 0)  # an unknown label is refused before anything runs
    index = _copy_index(model, mark_novel, show_copies or min_novel is not None)
    if beam is not None:
        for r in model.beam_search(prime, beam, length, length_penalty, label=label):
            row = {"text": r.text, "logprob": r.logprob, "ended": r.ended}
            _mark_copies(row, index, mark_novel, show_copies)
            click.echo(json.dumps(row, ensure_ascii=False) if as_json else
                       f"{r.logprob:10.3f}  {r.text!r}" + _novelty(row) + _copy_note(row))
        return
    if as_json or num_samples > 1 or mark_novel or show_copies or min_novel is not None:
        samples = model.sample(config)
        if min_novel is not None:
            samples = _redraw_copies(model, config, samples, index, min_novel)
        for i, s in enumerate(samples):
            row = {"text": s.text, "ended": s.ended, "finish": s.finish}
            if s.label is not None:
                row["label"] = s.label
            _mark_copies(row, index, mark_novel, show_copies)
            if as_json:
                click.echo(json.dumps(row, ensure_ascii=False))
            elif mark_novel and not show_copies:
                click.echo(s.text + _novelty(row) + _label_note(row))
            else:
                click.echo(f"--- sample {i + 1} ---{_label_note(row)}{_novelty(row)}{_copy_note(row)}\n{s.text}")
        return
    for n, (pieces, _) in enumerate(model.stream(config)):
        if n == 0 and model.labels is not None and label is None:  # the label it drew, apart from the text
            click.echo(f"charrnn: label {model.last_labels[0]} (drawn in the training proportions)", err=True)
        click.echo(pieces[0], nl=False)  # echo flushes: text appears as it is generated
    click.echo()


def _label_note(row: dict) -> str:
    return f"  (label {row['label']})" if "label" in row else ""


def _split_cpu_for_sampling(run: Path, checkpoint: str, num_samples: int) -> None:
    """Split the CPU into devices before JAX starts when ``num_samples`` rows sample faster
    split (``parallel.sampling_devices``); a run that cannot be read is left to ``load`` to
    report."""
    from charrnn import checkpoint as ckpt
    from charrnn import parallel, runs
    from charrnn.errors import CheckpointError

    try:
        config, vocab = runs.read_run_files(ckpt.resolve(run, checkpoint).parent)
    except CheckpointError:
        return
    n = parallel.sampling_devices_for(config.model, vocab.size, num_samples)
    if n > 1:
        runtime.use_cpu_devices(n)


def _check_run_fits(run: Path, checkpoint: str, rows: int = 1) -> None:
    """Refuse a run whose (possibly edited) config.json describes a model this machine cannot
    hold, before anything is allocated (a malformed config.json or vocab.json is reported here,
    naming the file and the field)."""
    from charrnn import checkpoint as ckpt
    from charrnn import limits, runs
    from charrnn.errors import CheckpointError

    try:
        run_dir = ckpt.resolve(run, checkpoint).parent
    except CheckpointError:
        if not (run / runs.CONFIG_FILE).is_file():
            raise  # not a run, or no checkpoint yet: that is the message
        run_dir = run  # its files are still checked first
    config, vocab = runs.read_run_files(run_dir)
    limits.check_fits(config, vocab.size, training=False, rows=rows, where=str(run_dir / "config.json"))


MIN_NOVEL_ROUNDS = 10  # --min-novel re-draws at most this many times


def _copy_index(model, mark_novel: bool, copies: bool):
    """The run's copy index (``charrnn.copies``) when a flag needs it. ``--mark-novel`` alone
    on a run without ``tokens.npy`` (trained before it was kept) reads the corpus again."""
    if not (mark_novel or copies):
        return None
    from charrnn.copies import CopyIndex

    try:
        return CopyIndex.for_run(model.run_dir)
    except CharrnnError:
        if copies:
            raise
        return _DocumentSet(model.training_documents())


class _DocumentSet:
    """``CopyIndex.contains_document`` over a set of documents (the old --mark-novel path)."""

    def __init__(self, docs: set):
        self.docs = docs

    def contains_document(self, text: str) -> bool:
        return text in self.docs


def _mark_copies(row: dict, index, mark_novel: bool, show_copies: bool) -> None:
    if mark_novel:
        row["novel"] = not index.contains_document(row["text"])
    if show_copies:
        c = index.longest_copy(row["text"])
        row["longest_copy"] = {"start": c.start, "length": c.length}


def _copy_note(row: dict) -> str:
    if "longest_copy" not in row:
        return ""
    c = row["longest_copy"]
    if not c["length"]:
        return "  (nothing copied from the training text)"
    span = row["text"][c["start"]:c["start"] + c["length"]]
    return f"  (longest copy from the training text: {c['length']} chars at {c['start']}: {span!r})"


def _redraw_copies(model, config, samples: list, index, min_novel: int) -> list:
    """Re-draw the samples whose longest verbatim copy is ``min_novel`` characters or more,
    at most ``MIN_NOVEL_ROUNDS`` times; says on stderr how many still copy. Round ``r`` of a
    seeded run uses a seed derived from it, so the output stays reproducible."""
    import dataclasses

    samples = list(samples)
    for r in range(1, MIN_NOVEL_ROUNDS + 1):
        bad = [i for i, s in enumerate(samples) if index.longest_copy(s.text).length >= min_novel]
        if not bad:
            return samples
        seed = None if config.seed is None else (config.seed + r * 0x9E3779B97F4A7C15) % 2 ** 64
        again = model.sample(dataclasses.replace(config, num_samples=len(bad), seed=seed))
        for i, s in zip(bad, again):
            samples[i] = s
    bad = [i for i, s in enumerate(samples) if index.longest_copy(s.text).length >= min_novel]
    if bad:
        click.echo(f"charrnn: {len(bad)} sample(s) still copy {min_novel} or more characters from the "
                   f"training text after {MIN_NOVEL_ROUNDS} re-draws", err=True)
    return samples


def _novelty(row: dict) -> str:
    return "" if "novel" not in row else ("  (new)" if row["novel"] else "  (in training data)")


@cli.command(name="eval")
@click.argument("run", type=click.Path())
@click.argument("file", type=click.Path())
@click.option("--checkpoint", type=click.Choice(["best", "latest"]), default="best", show_default=True)
@click.option("--encoding", default=None, help="Codec of FILE [default: the run's].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_cmd(run: str, file: str, checkpoint: str, encoding: Optional[str], as_json: bool) -> None:
    """Loss of RUN's model on FILE, in nats/char, bits/char and perplexity."""
    from charrnn.config import check_encoding

    if encoding is not None:
        check_encoding(encoding)
    path = Path(file)
    if not (path.is_file() or path.is_dir()):
        raise CharrnnError(f"no such file: {file}")
    _check_run_fits(Path(run), checkpoint)
    _setup_jax()
    from charrnn.data import read_text_file
    from charrnn.inference import load

    model = load(Path(run), checkpoint)
    if model.labels is not None:  # FILE in the run's --labels format: the loss per label too
        if encoding is not None:
            model.config = dataclasses.replace(
                model.config, data=dataclasses.replace(model.config.data, encoding=encoding))
        result = model.evaluate_labelled(path)
    elif not path.is_file():
        raise CharrnnError(f"{file} is a directory: charrnn eval reads a text file")
    else:
        result = model.evaluate(read_text_file(path, encoding or model.config.data.encoding))
    if as_json:
        click.echo(json.dumps({"file": file, "checkpoint": str(model.checkpoint), "step": model.step, **result}))
    else:
        click.echo(f"{file}: {result['nats']:.4f} nats/char, {result['bits']:.4f} bits/char, "
                   f"perplexity {result['perplexity']:.3f} over {result['chars']:,} chars "
                   f"(step {model.step})")
        for name, r in result.get("labels", {}).items():
            click.echo(f"  {name}: {r['nats']:.4f} nats/char, {r['bits']:.4f} bits/char over {r['chars']:,} chars")


@cli.command()
@click.argument("run", type=click.Path())
@click.option("--checkpoint", type=click.Choice(["best", "latest"]), default="latest", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def info(run: str, checkpoint: str, as_json: bool) -> None:
    """Config, vocabulary size, parameter count, step and losses of RUN."""
    _check_run_fits(Path(run), checkpoint)
    from charrnn import checkpoint as ckpt
    from charrnn.inference import load

    model = load(Path(run), checkpoint)
    best = ckpt.read_pointer(model.run_dir, "best")
    d = {"run": str(model.run_dir), "checkpoint": model.checkpoint.name, "step": model.step,
         "params": model.num_params, "vocab_size": model.vocab.size,
         "best_val_loss": model.meta.get("best_val"), "best_step": model.meta.get("best_step"),
         "best_checkpoint": best, "chars_seen": model.meta.get("chars_seen"),
         "checkpoints": [p.name for p in ckpt.list_checkpoints(model.run_dir)],
         "config": model.config.to_dict()}
    if model.labels is not None:  # a labelled run: its labels and their training documents
        d["labels"] = dict(zip(model.labels.names, model.labels.counts))
    if as_json:
        click.echo(json.dumps(d))
        return
    c = model.config
    click.echo(f"run          {d['run']}  ({c.corpus})")
    click.echo(f"model        {c.model.cell} {c.model.layers}x{c.model.hidden}, dropout {c.model.dropout}, "
               f"{d['params']:,} parameters, vocabulary {d['vocab_size']}")
    click.echo(f"training     batch {c.train.batch_size} x seq {c.train.seq_len}, {c.train.optimizer} "
               f"lr {c.train.lr} ({c.train.lr_schedule}), docs={c.data.docs}")
    click.echo(f"checkpoint   {d['checkpoint']} at step {d['step']} ({d['chars_seen'] or 0:,} chars seen)")
    if d["best_val_loss"] is not None:
        click.echo(f"best val     {d['best_val_loss']:.4f} nats/char "
                   f"({d['best_val_loss'] / math.log(2):.4f} bits/char) at step {d['best_step']}")
    click.echo(f"checkpoints  {', '.join(d['checkpoints'])}")
    if "labels" in d:
        click.echo(f"labels       {', '.join(f'{n} ({k} docs)' for n, k in d['labels'].items())}")


@cli.group(invoke_without_command=True)
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Cache for downloaded corpora.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per corpus.")
@click.pass_context
def corpora(ctx, cache_dir: Optional[str], as_json: bool) -> None:
    """List named corpora (built-in ones need no network); `corpora get NAME` downloads one."""
    ctx.obj = {"cache_dir": cache_dir}
    if ctx.invoked_subcommand is not None:
        return
    from charrnn import corpora as corpora_mod

    for row in corpora_mod.describe(cache_dir=cache_dir):
        if as_json:
            click.echo(json.dumps(row))
            continue
        state = "built-in" if row["kind"] == "built-in" else (
            f"cached at {row['cached']}" if row.get("cached") else "download with: charrnn corpora get " + row["name"])
        click.echo(f"{row['name']:<16} {row.get('size', ''):<12} {row['description']}\n{'':<16} {state}")


@corpora.command(name="get")
@click.argument("name")
@click.option("--mirror", default=None, help="URL prefix or directory to download from [env CHARRNN_MIRROR].")
@click.pass_context
def corpora_get(ctx, name: str, mirror: Optional[str]) -> None:
    """Download corpus NAME once into the cache, verify its SHA-256 and unpack it."""
    from tqdm.auto import tqdm

    from charrnn import corpora as corpora_mod

    bar = None

    def progress(done: int, total: Optional[int]) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="B", unit_scale=True, desc=name, file=sys.stderr, dynamic_ncols=True)
        bar.update(done - bar.n)

    try:
        path = corpora_mod.get(name, cache_dir=ctx.obj["cache_dir"], mirror=mirror, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    click.echo(f"{name}: {path}")


@cli.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", default="loss.png", show_default=True, type=click.Path(dir_okay=False),
              help="Image to write (.png, .svg or .pdf).")
def plot(runs: tuple[str, ...], output: str) -> None:
    """Draw train and validation loss of one or more RUNS against step and characters seen."""
    from charrnn.plot import plot_runs

    click.echo(f"wrote {plot_runs([Path(r) for r in runs], Path(output))}")


@cli.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port (0: any free one).")
@click.option("--checkpoint", type=click.Choice(["best", "latest"]), default="best", show_default=True)
@click.option("--api-key", envvar="CHARRNN_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on /v1 [env CHARRNN_API_KEY].")
@click.option("--max-tokens", type=int, default=4096, show_default=True,
              help="Cap on a request's max_tokens (characters).")
@click.option("--max-n", type=int, default=16, show_default=True, help="Cap on completions per request.")
@click.option("--max-prompt", type=int, default=4096, show_default=True, help="Cap on prompt characters.")
@click.option("--max-concurrent", type=int, default=64, show_default=True,
              help="Requests generating at once (more get HTTP 429).")
@click.option("--max-body", type=int, default=64 * 1024, show_default=True, help="Cap on request body bytes.")
@click.option("--max-batch", type=int, default=256, show_default=True,
              help="Rows sampled at once per model (more wait for a free row).")
def serve(runs: tuple[str, ...], host: str, port: int, checkpoint: str, api_key: Optional[str], max_tokens: int,
          max_n: int, max_prompt: int, max_concurrent: int, max_body: int, max_batch: int) -> None:
    """Serve RUNS over an OpenAI-compatible API (/v1/completions, /v1/models) with a playground at /.

    Each run is the model named by its directory. Needs the serve extra: pip install -e ".[serve]".
    """
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise CharrnnError('charrnn serve needs FastAPI and uvicorn: pip install -e ".[serve]"') from None
    from charrnn.inference import load
    from charrnn.serve import ServeLimits, create_app
    from charrnn.serve.server import bind, make_server
    from charrnn.serve.server import serve as run_server

    limits = ServeLimits(max_tokens=max_tokens, max_n=max_n, max_prompt=max_prompt, max_concurrent=max_concurrent,
                         max_body=max_body, max_batch=max_batch, default_max_tokens=min(256, max_tokens))
    if api_key is not None and not api_key.strip():
        raise CharrnnError("--api-key must not be empty")
    names = [Path(r).resolve().name for r in runs]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise CharrnnError(f"two runs are named {dup!r}; model ids are run directory names and must differ")
    _setup_jax()
    loaded = {name: load(r, checkpoint) for name, r in zip(names, runs)}
    sock = bind(host, port)
    server = make_server(create_app(loaded, limits, api_key=api_key, warm_up=True), sock)
    url = f"http://{host}:{sock.getsockname()[1]}"
    run_server(server, sock, on_ready=lambda: click.echo(
        f"serving {', '.join(names)} on {url} (playground {url}/, API {url}/v1); Ctrl-C stops", err=True))


@cli.command()
@click.argument("run", type=click.Path())
@click.option("--checkpoint", type=click.Choice(["best", "latest"]), default="best", show_default=True)
@click.option("--onnx", "onnx_path", type=click.Path(), default=None,
              help="Write one step of the model as ONNX (needs the export extra).")
@click.option("--html", "html_path", type=click.Path(), default=None,
              help="Write one self-contained web page that samples in the browser.")
@click.option("--force", is_flag=True, help="Replace output files that already exist.")
def export(run: str, checkpoint: str, onnx_path: Optional[str], html_path: Optional[str], force: bool) -> None:
    """Export RUN to use without charrnn: an ONNX model (--onnx) and/or a web page (--html)."""
    from charrnn.inference import load

    outputs = {kind: Path(p) for kind, p in (("onnx", onnx_path), ("html", html_path)) if p}
    if not outputs:
        raise click.UsageError("export: give an output: --onnx PATH and/or --html PATH")
    if len({p.resolve() for p in outputs.values()}) < len(outputs):
        raise click.UsageError("export: --onnx and --html name the same file")
    for path in outputs.values():  # every output is checked before the run is even read
        if path.is_dir():
            raise CharrnnError(f"export: {path} is a directory")
        if path.exists() and not force:
            raise CharrnnError(f"export: {path} exists (--force replaces it)")
        if not path.parent.is_dir():
            raise CharrnnError(f"export: no directory {path.parent} to write {path.name} into")
    writers = []
    if "onnx" in outputs:
        from charrnn.export import onnx as onnx_export

        onnx_export.check_installed()
        writers.append((outputs["onnx"], onnx_export.export_onnx))
    if "html" in outputs:
        from charrnn.export.html import write_html

        writers.append((outputs["html"], write_html))
    model = load(Path(run), checkpoint)
    for path, write in writers:
        _write_atomically(path, lambda tmp: write(model, tmp))
        click.echo(f"wrote {path} ({path.stat().st_size:,} bytes)")


def _write_atomically(path: Path, write) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it over ``path``: a
    reader never sees half a file, and a failure leaves any old file as it was."""
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _command(args: list) -> Optional[str]:
    """The subcommand ``args`` name (the group's own options take no values)."""
    return next((a for a in args if not a.startswith("-")), None)


def main() -> None:
    """Entry point of the ``charrnn`` command; a script may call it too.

    As the command itself (``runtime.launched_as_command``) it owns the process: signals are
    handled from the start, and ``charrnn train`` re-executes itself with glibc's huge-page
    tunable first of all (glibc reads it only at start-up). Called from a user's script it
    does neither: no re-execution (that would run the script's top again), no signal takeover.
    """
    if runtime.launched_as_command():
        runtime.install_signal_handling()
        if _command(sys.argv[1:]) == "train":
            runtime.rerun_with_huge_pages()
    cli.main()


if __name__ == "__main__":
    main()

"""The ``charrnn`` command line: parses, builds configs, calls the library, prints."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, Optional

import click

from charrnn.config import DataConfig, ModelConfig, RunConfig, SampleConfig, TrainConfig
from charrnn.errors import CharrnnError

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
        try:
            rv = super().main(args=args, prog_name=prog_name or "charrnn", standalone_mode=False, **extra)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            _fail("aborted", 130)
        except click.ClickException as e:
            if debug:
                traceback.print_exc()
            _fail(e.format_message(), EXIT_USAGE if isinstance(e, click.UsageError) else EXIT_ERROR)
        except CharrnnError as e:
            if debug:
                traceback.print_exc()
            _fail(str(e))
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except Exception as e:  # a bug: still one line, the traceback on request
            if debug:
                traceback.print_exc()
            _fail(f"internal error: {type(e).__name__}: {e} (run with --debug for the traceback)")
        sys.exit(rv if isinstance(rv, int) else 0)


def _setup_jax() -> None:
    """Persist XLA's compilation cache so a second ``charrnn sample`` starts in a second or two."""
    import jax

    if os.environ.get("CHARRNN_NO_XLA_CACHE") == "1":
        return
    base = os.environ.get("CHARRNN_XLA_CACHE")
    if not base:
        root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = os.path.join(root, "charrnn", "xla")
    try:
        os.makedirs(base, exist_ok=True)
    except OSError:
        return  # an unwritable cache only costs start-up time
    jax.config.update("jax_compilation_cache_dir", base)
    # Our programs compile in well under JAX's 1 s default threshold; cache them all.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


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
    """SIGINT/SIGTERM set a flag the training loop polls; a second SIGINT exits at once."""

    def __init__(self):
        self.reason: Optional[str] = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.reason is not None and name == "SIGINT":
            # The last committed checkpoint is intact: commits are atomic renames.
            os.write(2, b"\ncharrnn: interrupted again; exiting now (the last checkpoint is intact)\n")
            os._exit(130)
        self.reason = name
        os.write(2, f"\ncharrnn: {name} received; finishing this step and saving a checkpoint "
                    f"(Ctrl-C again to quit at once)\n".encode())

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False

    def __call__(self) -> Optional[str]:
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
@click.option("--num-processes", type=int, help="Multi-process training: how many processes.")
@click.option("--process-id", type=int, help="Multi-process training: this process's index.")
@click.option("--distributed", is_flag=True, help="Multi-process training, detected from the cluster (SLURM, ...).")
@click.option("--cpu-devices", type=click.IntRange(min=1), default=None,
              help="On CPU, split the machine into N data-parallel devices [default: one per core, "
                   "when the batch divides evenly with at least 8 streams each].")
@_config_options
def train(corpus: str, out: Optional[str], resume: bool, overwrite: bool, init_from: Optional[str],
          cache_dir: Optional[str], quiet: bool, coordinator: Optional[str], num_processes: Optional[int],
          process_id: Optional[int], distributed: bool, cpu_devices: Optional[int], **options) -> int:
    """Train a model on CORPUS: a text file, a directory of text files, or a corpus name.

    Writes config.json, vocab.json, metrics.jsonl and checkpoints into the run directory.
    """
    _setup_jax()
    from charrnn import parallel, runs
    from charrnn.train import train as train_run
    from charrnn.train import use_training_xla_flags

    if resume:
        if not out:
            raise CharrnnError("--resume needs --out RUN_DIR naming the run to continue")
        saved, _ = runs.read_run_files(Path(out))
        config = build_run_config(options, saved)
    else:
        config = build_run_config(options)
    multi_process = coordinator is not None or distributed
    if cpu_devices is None and not multi_process:
        cpu_devices = parallel.auto_cpu_devices(config.train.batch_size)
    if cpu_devices is not None:
        parallel.use_cpu_devices(cpu_devices)  # before anything starts JAX's backends
    use_training_xla_flags()  # likewise: XLA:CPU's memory-saving schedule, XLA:GPU's deterministic ops
    parallel.initialize(coordinator, num_processes, process_id, auto=distributed)
    import jax

    if jax.process_index() != 0:
        quiet = True

    if cache_dir:
        os.environ["CHARRNN_CACHE"] = cache_dir
    progress = TrainProgress(quiet)
    try:
        with SignalStop() as stop:
            result = train_run(corpus, config, Path(out) if out else None, resume=resume, overwrite=overwrite,
                               init_from=Path(init_from) if init_from else None,
                               on_event=progress, should_stop=stop)
    finally:
        progress.close()
    if jax.process_index() != 0:
        return SIGNAL_EXIT.get(result.stop_reason, 0)
    val = result.last_val
    summary = f"stopped at step {result.step} ({result.stop_reason})"
    if val:
        summary += f"; val loss {val['nats']:.4f} nats/char ({val['bits']:.4f} bits/char)"
    if result.best_val is not None:
        summary += f"; best {result.best_val:.4f}"
    click.echo(summary, err=True)
    click.echo(f"saved in {result.run_dir}; sample with: charrnn sample {result.run_dir}", err=True)
    return SIGNAL_EXIT.get(result.stop_reason, 0)


@cli.command()
@click.argument("run", type=click.Path())
@click.option("--length", type=int, default=SampleConfig.length, show_default=True,
              help="Characters to generate per sample (fewer if the end token comes first).")
@click.option("--temperature", type=float, default=SampleConfig.temperature, show_default=True,
              help="Divide the logits by this (lower: safer, higher: wilder).")
@click.option("--top-k", type=int, default=None, help="Sample only from the K most likely characters.")
@click.option("--top-p", type=float, default=None, help="Sample only from the smallest set with probability P.")
@click.option("--greedy", is_flag=True, help="Always take the most likely character.")
@click.option("--prime", default="", help="Text to start from (printed as part of the sample).")
@click.option("--num-samples", "-n", type=int, default=1, show_default=True, help="Samples generated at once.")
@click.option("--seed", type=int, default=None, help="Seed for reproducible samples [default: random].")
@click.option("--checkpoint", type=click.Choice(["best", "latest"]), default="best", show_default=True)
@click.option("--json", "as_json", is_flag=True, help='One JSON object per sample: {"text": ..., "ended": ...}.')
@click.option("--beam", type=int, default=None,
              help="Beam search: print the K most probable continuations instead of sampling.")
@click.option("--length-penalty", type=float, default=0.0, show_default=True,
              help="Beam ranking divides the log-probability by length**this.")
@click.option("--mark-novel", is_flag=True,
              help="Mark samples that are not documents of the training data (for --docs line runs).")
def sample(run: str, length: int, temperature: float, top_k, top_p, greedy: bool, prime: str, num_samples: int,
           seed, checkpoint: str, as_json: bool, beam: Optional[int], length_penalty: float,
           mark_novel: bool) -> None:
    """Generate text from a trained RUN directory."""
    config = SampleConfig(length=length, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy,
                          prime=prime, num_samples=num_samples, seed=seed)
    _setup_jax()
    if beam is None:
        _split_cpu_for_sampling(Path(run), checkpoint, num_samples)
    from charrnn.inference import load

    model = load(Path(run), checkpoint)
    model.check_prime(prime)
    known = model.training_documents() if mark_novel else None
    if beam is not None:
        for r in model.beam_search(prime, beam, length, length_penalty):
            row = {"text": r.text, "logprob": r.logprob, "ended": r.ended}
            if known is not None:
                row["novel"] = r.text not in known
            click.echo(json.dumps(row, ensure_ascii=False) if as_json else
                       f"{r.logprob:10.3f}  {r.text!r}" + _novelty(row))
        return
    if as_json or num_samples > 1 or known is not None:
        for i, s in enumerate(model.sample(config)):
            row = {"text": s.text, "ended": s.ended}
            if known is not None:
                row["novel"] = s.text not in known
            if as_json:
                click.echo(json.dumps(row, ensure_ascii=False))
            elif known is not None:
                click.echo(s.text + _novelty(row))
            else:
                click.echo(f"--- sample {i + 1} ---\n{s.text}")
        return
    for pieces, _ in model.stream(config):
        click.echo(pieces[0], nl=False)  # echo flushes: text appears as it is generated
    click.echo()


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
        parallel.use_cpu_devices(n)


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
    _setup_jax()
    from charrnn.data import read_text_file
    from charrnn.inference import load

    model = load(Path(run), checkpoint)
    path = Path(file)
    if not path.is_file():
        raise CharrnnError(f"no such file: {file}")
    result = model.evaluate(read_text_file(path, encoding or model.config.data.encoding))
    if as_json:
        click.echo(json.dumps({"file": file, "checkpoint": str(model.checkpoint), "step": model.step, **result}))
    else:
        click.echo(f"{file}: {result['nats']:.4f} nats/char, {result['bits']:.4f} bits/char, "
                   f"perplexity {result['perplexity']:.3f} over {result['chars']:,} chars "
                   f"(step {model.step})")


@cli.command()
@click.argument("run", type=click.Path())
@click.option("--checkpoint", type=click.Choice(["best", "latest"]), default="latest", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def info(run: str, checkpoint: str, as_json: bool) -> None:
    """Config, vocabulary size, parameter count, step and losses of RUN."""
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


def _command(args: list) -> Optional[str]:
    """The subcommand ``args`` name (the group's own options take no values)."""
    return next((a for a in args if not a.startswith("-")), None)


def main() -> None:
    """Console-script entry point."""
    if _command(sys.argv[1:]) == "train":
        # First of all, while nothing has started: glibc reads the tunable only at start-up.
        from charrnn import hugepages

        hugepages.rerun_with_huge_pages()
    cli.main()


if __name__ == "__main__":
    main()

"""Frozen configuration dataclasses: the single source of truth for CLI and library."""

from __future__ import annotations

import contextvars
import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from charrnn.errors import CharrnnError

# The cell kinds and their gate blocks: the one list every module reads (charrnn.cells defines them).
GATES = {"rnn": 1, "lstm": 4, "gru": 3}
CELLS = tuple(GATES)
OPTIMIZERS = ("adam", "adamw", "rmsprop", "sgd")
SCHEDULES = ("constant", "cosine", "exponential")
DOC_MODES = ("file", "line", "paragraph")
LABEL_MODES = ("none", "tsv", "dirs")  # how a corpus names each document's label (charrnn.labels)
DTYPES = ("float32", "bfloat16")
DEFAULT_EPOCHS = 10  # when no --max-steps/--epochs/--minutes is given


# Bounds every numeric setting is checked against before anything is built. Counts (steps,
# sizes) stay within int32, which JAX's step counters and shapes use; seeds within what
# ``prng.key_from_seed`` takes; floats finite in float32, the precision training runs in.
MAX_COUNT = 2**31 - 1
SEED_LIMIT = 2**64
FLOAT32_MAX = 3.4028234663852886e38
MAX_LR = 1e3

# While a config is read back from a file, messages name fields ("field train.lr") instead of
# command-line options ("--lr"); see ``RunConfig.from_dict``.
_FROM_FILE = contextvars.ContextVar("charrnn_config_from_file", default=False)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise CharrnnError(message)


def _label(section: str, name: str) -> str:
    """How an error names a setting: ``--seq-len`` on the command line, ``field train.seq_len``
    in a run's config.json."""
    return f"field {section}.{name}" if _FROM_FILE.get() else "--" + name.replace("_", "-")


def check_types(obj, section: str) -> None:
    """Check every field of the dataclass ``obj`` against its annotation before any range check.

    ``bool`` is not an int here (``True`` is no layer count), ints are accepted for floats, and a
    float must be finite in float32. Raises ``CharrnnError`` naming the field.
    """
    for f in dataclasses.fields(obj):
        value, kind = getattr(obj, f.name), str(f.type)
        optional = kind.startswith("Optional[")
        kind = kind[len("Optional["):-1] if optional else kind
        if value is None and optional:
            continue
        label = _label(section, f.name)
        if kind == "int":
            _check(isinstance(value, int) and not isinstance(value, bool),
                   f"{label} must be an integer, not {value!r}")
        elif kind == "float":
            _check(isinstance(value, (int, float)) and not isinstance(value, bool),
                   f"{label} must be a number, not {value!r}")
            _check(math.isfinite(value) and abs(value) <= FLOAT32_MAX,
                   f"{label} must be a finite number, not {value!r}")
        elif kind == "bool":
            _check(isinstance(value, bool), f"{label} must be true or false, not {value!r}")
        elif kind == "str":
            _check(isinstance(value, str), f"{label} must be a string, not {value!r}")


def check_int(section: str, name: str, value: Optional[int], low: int = 1, high: int = MAX_COUNT) -> None:
    """``low <= value <= high`` (None passes: an unset optional setting)."""
    if value is not None:
        _check(low <= value <= high, f"{_label(section, name)} must be in [{low}, {high}], not {value}")


def check_float(section: str, name: str, value: Optional[float], low: float, high: float,
                low_open: bool = False, high_open: bool = False) -> None:
    """``value`` within ``[low, high]``, either end open as asked (None passes)."""
    if value is None:
        return
    ok = (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    _check(ok, f"{_label(section, name)} must be in {interval}, not {value}")


def check_choice(section: str, name: str, value: str, choices) -> None:
    _check(value in choices, f"{_label(section, name)} must be one of {', '.join(choices)}, not {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the network.

    Attributes:
        cell: ``rnn`` (tanh), ``lstm`` or ``gru``.
        layers: number of stacked cells.
        hidden: width of every cell's state.
        dropout: dropout rate applied between layers (and before the output layer) in training.
        label_dim: width of each label's learned vector (read only by a labelled run).
    """

    cell: str = "lstm"
    layers: int = 2
    hidden: int = 128
    dropout: float = 0.0
    label_dim: int = 16

    def __post_init__(self):
        check_types(self, "model")
        check_choice("model", "cell", self.cell, CELLS)
        check_int("model", "layers", self.layers)
        check_int("model", "hidden", self.hidden)
        check_float("model", "dropout", self.dropout, 0.0, 1.0, high_open=True)
        check_int("model", "label_dim", self.label_dim, high=4096)


@dataclass(frozen=True)
class DataConfig:
    """How a corpus becomes a stream of token ids.

    Attributes:
        docs: ``file`` (one document per file), ``line`` (per non-empty line) or
            ``paragraph`` (separated by blank lines).
        encoding: text codec of the corpus files.
        val_frac: the last fraction of the character stream held out for validation.
        labels: ``none``; ``tsv`` (``label<TAB>text`` lines) or ``dirs`` (one sub-directory
            per label): each document's label, read by ``charrnn.labels``.
    """

    docs: str = "file"
    encoding: str = "utf-8"
    val_frac: float = 0.1
    labels: str = "none"

    def __post_init__(self):
        check_types(self, "data")
        check_choice("data", "docs", self.docs, DOC_MODES)
        check_choice("data", "labels", self.labels, LABEL_MODES)
        check_float("data", "val_frac", self.val_frac, 0.0, 1.0, high_open=True)
        check_encoding(self.encoding, _label("data", "encoding"))


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and run-length settings.

    Length: training stops at the first of ``max_steps``, ``epochs`` and ``minutes`` that is
    reached; with none of them set it runs ``DEFAULT_EPOCHS`` epochs.
    """

    batch_size: int = 50
    seq_len: int = 50
    optimizer: str = "adam"
    lr: float = 2e-3
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    grad_clip: float = 5.0
    weight_decay: float = 0.0
    max_steps: Optional[int] = None
    epochs: Optional[float] = None
    minutes: Optional[float] = None
    eval_every: int = 500
    save_every: Optional[int] = None
    patience: Optional[int] = None
    keep: int = 2
    seed: int = 0
    dtype: str = "float32"
    max_bad_steps: int = 10
    log_every: int = 10
    sample_every: int = 0
    sample_length: int = 200

    def __post_init__(self):
        check_types(self, "train")
        for name in ("batch_size", "seq_len", "max_steps", "eval_every", "save_every", "patience", "keep",
                     "max_bad_steps", "log_every", "sample_length"):
            check_int("train", name, getattr(self, name))
        for name in ("warmup_steps", "sample_every"):
            check_int("train", name, getattr(self, name), low=0)
        check_int("train", "seed", self.seed, low=0, high=SEED_LIMIT - 1)
        check_choice("train", "optimizer", self.optimizer, OPTIMIZERS)
        check_choice("train", "lr_schedule", self.lr_schedule, SCHEDULES)
        check_choice("train", "dtype", self.dtype, DTYPES)
        check_float("train", "lr", self.lr, 0.0, MAX_LR, low_open=True)
        check_float("train", "grad_clip", self.grad_clip, 0.0, FLOAT32_MAX)  # 0 turns clipping off
        check_float("train", "weight_decay", self.weight_decay, 0.0, MAX_LR)
        # Enough for any run (a million epochs; ~1900 years), small enough to count in.
        check_float("train", "epochs", self.epochs, 0.0, 1e6, low_open=True)
        check_float("train", "minutes", self.minutes, 0.0, 1e9, low_open=True)

    @property
    def checkpoint_every(self) -> int:
        """Steps between checkpoints: ``save_every``, else every evaluation."""
        return self.save_every or self.eval_every


@dataclass(frozen=True)
class SampleConfig:
    """How text is generated from a trained model.

    ``temperature`` divides the logits; ``top_k`` keeps the k most likely characters;
    ``top_p`` keeps the smallest set whose probability reaches p; ``greedy`` takes the argmax.
    ``seed=None`` draws fresh randomness (a seed in [0, 2**64) reproduces a sample).
    Penalties, counted per sample over the characters it generated (and the prime's with
    ``penalize_prime``): ``presence_penalty`` is subtracted from a character's logit once it
    has appeared, ``frequency_penalty`` times its count (OpenAI's meaning); a
    ``repetition_penalty`` R divides the positive logits of those characters by R and
    multiplies the negative ones (CTRL's; 1 is off). ``stop``: a sample ends before the first
    occurrence of any of these strings. ``label`` (a labelled run): the label to write in, or a
    mix ``"a=0.7,b=0.3"``; None draws each sample's label in the training proportions.
    """

    length: int = 500
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    greedy: bool = False
    prime: str = ""
    num_samples: int = 1
    seed: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    penalize_prime: bool = False
    stop: tuple = ()
    label: Optional[str] = None

    def __post_init__(self):
        check_types(self, "sample")
        _check(self.label is None or self.label.strip() != "", "--label must name a label, not an empty string")
        _check(self.length >= 1, f"--length must be at least 1, not {self.length}")
        _check(self.temperature > 0,
               f"--temperature must be greater than 0, not {self.temperature} (use --greedy for argmax)")
        _check(self.top_k is None or self.top_k >= 1, f"--top-k must be at least 1, not {self.top_k}")
        _check(self.top_p is None or 0.0 < self.top_p <= 1.0, f"--top-p must be in (0, 1], not {self.top_p}")
        _check(self.num_samples >= 1, f"--num-samples must be at least 1, not {self.num_samples}")
        check_int("sample", "num_samples", self.num_samples)
        _check(self.seed is None or 0 <= self.seed < SEED_LIMIT,
               f"--seed must be in [0, 2**64), not {self.seed}")
        _check(self.repetition_penalty > 0,
               f"--repetition-penalty must be greater than 0 (1 is off), not {self.repetition_penalty}")
        stops = (self.stop,) if isinstance(self.stop, str) else self.stop
        _check(isinstance(stops, (tuple, list)) and all(isinstance(s, str) and s for s in stops),
               f"--stop must be non-empty strings, not {self.stop!r}")
        object.__setattr__(self, "stop", tuple(stops))

    @property
    def penalties(self) -> bool:
        """Whether any penalty is on (the sampler then counts characters on device)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a training run; saved as ``config.json`` in the run directory."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    corpus: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        """Build from a dict as written by ``to_dict``; unknown or missing keys raise ``CharrnnError``."""
        if not isinstance(d, dict):
            raise CharrnnError("expected a JSON object")
        unknown = sorted(set(d) - {"model", "data", "train", "corpus"})
        if unknown:
            raise CharrnnError(f"unknown field(s): {', '.join(unknown)}")
        corpus = d.get("corpus", "")
        if not isinstance(corpus, str):
            raise CharrnnError(f"field corpus must be a string, not {corpus!r}")
        token = _FROM_FILE.set(True)
        try:
            return cls(
                model=_sub(ModelConfig, d.get("model", {}), "model"),
                data=_sub(DataConfig, d.get("data", {}), "data"),
                train=_sub(TrainConfig, d.get("train", {}), "train"),
                corpus=corpus,
            )
        finally:
            _FROM_FILE.reset(token)


def _sub(klass, d, name):
    if not isinstance(d, dict):
        raise CharrnnError(f"field {name} must be a JSON object")
    known = {f.name for f in dataclasses.fields(klass)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise CharrnnError(f"unknown field(s): {', '.join(f'{name}.{u}' for u in unknown)}")
    return klass(**d)


def check_encoding(encoding, label: str = "--encoding") -> None:
    """``encoding`` names a text codec Python knows (``CharrnnError`` naming ``label`` if not)."""
    ok = isinstance(encoding, str) and "\0" not in encoding
    if ok:
        try:
            "".encode(encoding)
        except (LookupError, ValueError):
            ok = False
    _check(ok, f"unknown {label} {encoding!r} (a text codec such as utf-8 or latin-1)")


def check_argument(function: str, name: str, value, types: tuple, optional: bool = False) -> None:
    """``TypeError`` naming ``function``'s parameter ``name`` unless ``value`` is one of ``types``
    (or None when ``optional``). Library entry points call it before building anything: an int
    taken for a path would otherwise be opened as a file descriptor (and closed)."""
    if (value is None and optional) or (isinstance(value, types) and not isinstance(value, bool)):
        return
    wanted = " or ".join(t.__name__ for t in types) + (" or None" if optional else "")
    raise TypeError(f"{function}: {name} must be {wanted}, not {type(value).__name__} ({value!r:.60})")

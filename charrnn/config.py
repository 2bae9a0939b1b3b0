"""Frozen configuration dataclasses: the single source of truth for CLI and library."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Optional

from charrnn.errors import CharrnnError

CELLS = ("rnn", "lstm", "gru")
OPTIMIZERS = ("adam", "adamw", "rmsprop", "sgd")
SCHEDULES = ("constant", "cosine", "exponential")
DOC_MODES = ("file", "line", "paragraph")
DTYPES = ("float32", "bfloat16")
DEFAULT_EPOCHS = 10  # when no --max-steps/--epochs/--minutes is given


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise CharrnnError(message)


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the network.

    Attributes:
        cell: ``rnn`` (tanh), ``lstm`` or ``gru``.
        layers: number of stacked cells.
        hidden: width of every cell's state.
        dropout: dropout rate applied between layers (and before the output layer) in training.
    """

    cell: str = "lstm"
    layers: int = 2
    hidden: int = 128
    dropout: float = 0.0

    def __post_init__(self):
        _check(self.cell in CELLS, f"--cell must be one of {', '.join(CELLS)}, not {self.cell!r}")
        _check(self.layers >= 1, f"--layers must be at least 1, not {self.layers}")
        _check(self.hidden >= 1, f"--hidden must be at least 1, not {self.hidden}")
        _check(0.0 <= self.dropout < 1.0, f"--dropout must be in [0, 1), not {self.dropout}")


@dataclass(frozen=True)
class DataConfig:
    """How a corpus becomes a stream of token ids.

    Attributes:
        docs: ``file`` (one document per file), ``line`` (per non-empty line) or
            ``paragraph`` (separated by blank lines).
        encoding: text codec of the corpus files.
        val_frac: the last fraction of the character stream held out for validation.
    """

    docs: str = "file"
    encoding: str = "utf-8"
    val_frac: float = 0.1

    def __post_init__(self):
        _check(self.docs in DOC_MODES, f"--docs must be one of {', '.join(DOC_MODES)}, not {self.docs!r}")
        _check(0.0 <= self.val_frac < 1.0, f"--val-frac must be in [0, 1), not {self.val_frac}")
        try:
            "".encode(self.encoding)
        except LookupError:
            raise CharrnnError(f"unknown --encoding {self.encoding!r}") from None


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
        _check(self.batch_size >= 1, f"--batch-size must be at least 1, not {self.batch_size}")
        _check(self.seq_len >= 1, f"--seq-len must be at least 1, not {self.seq_len}")
        _check(self.optimizer in OPTIMIZERS,
               f"--optimizer must be one of {', '.join(OPTIMIZERS)}, not {self.optimizer!r}")
        _check(self.lr > 0, f"--lr must be positive, not {self.lr}")
        _check(self.lr_schedule in SCHEDULES,
               f"--lr-schedule must be one of {', '.join(SCHEDULES)}, not {self.lr_schedule!r}")
        _check(self.warmup_steps >= 0, f"--warmup-steps must be >= 0, not {self.warmup_steps}")
        _check(self.grad_clip >= 0, f"--grad-clip must be >= 0 (0 turns clipping off), not {self.grad_clip}")
        _check(self.weight_decay >= 0, f"--weight-decay must be >= 0, not {self.weight_decay}")
        _check(self.max_steps is None or self.max_steps >= 1, f"--max-steps must be at least 1, not {self.max_steps}")
        _check(self.epochs is None or self.epochs > 0, f"--epochs must be positive, not {self.epochs}")
        _check(self.minutes is None or self.minutes > 0, f"--minutes must be positive, not {self.minutes}")
        _check(self.eval_every >= 1, f"--eval-every must be at least 1, not {self.eval_every}")
        _check(self.save_every is None or self.save_every >= 1,
               f"--save-every must be at least 1, not {self.save_every}")
        _check(self.patience is None or self.patience >= 1, f"--patience must be at least 1, not {self.patience}")
        _check(self.keep >= 1, f"--keep must be at least 1, not {self.keep}")
        _check(self.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        _check(self.max_bad_steps >= 1, f"--max-bad-steps must be at least 1, not {self.max_bad_steps}")
        _check(self.log_every >= 1, f"--log-every must be at least 1, not {self.log_every}")
        _check(self.sample_every >= 0, f"--sample-every must be >= 0, not {self.sample_every}")
        _check(self.sample_length >= 1, f"--sample-length must be at least 1, not {self.sample_length}")
        _check(self.seed >= 0, f"--seed must be >= 0, not {self.seed}")

    @property
    def checkpoint_every(self) -> int:
        """Steps between checkpoints: ``save_every``, else every evaluation."""
        return self.save_every or self.eval_every


@dataclass(frozen=True)
class SampleConfig:
    """How text is generated from a trained model.

    ``temperature`` divides the logits; ``top_k`` keeps the k most likely characters;
    ``top_p`` keeps the smallest set whose probability reaches p; ``greedy`` takes the argmax.
    ``seed=None`` draws fresh randomness.
    """

    length: int = 500
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    greedy: bool = False
    prime: str = ""
    num_samples: int = 1
    seed: Optional[int] = None

    def __post_init__(self):
        _check(self.length >= 1, f"--length must be at least 1, not {self.length}")
        _check(self.temperature > 0,
               f"--temperature must be greater than 0, not {self.temperature} (use --greedy for argmax)")
        _check(self.top_k is None or self.top_k >= 1, f"--top-k must be at least 1, not {self.top_k}")
        _check(self.top_p is None or 0.0 < self.top_p <= 1.0, f"--top-p must be in (0, 1], not {self.top_p}")
        _check(self.num_samples >= 1, f"--num-samples must be at least 1, not {self.num_samples}")
        _check(self.seed is None or self.seed >= 0, f"--seed must be >= 0, not {self.seed}")


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
            raise CharrnnError("config: expected a JSON object")
        try:
            return cls(
                model=_sub(ModelConfig, d.get("model", {}), "model"),
                data=_sub(DataConfig, d.get("data", {}), "data"),
                train=_sub(TrainConfig, d.get("train", {}), "train"),
                corpus=str(d.get("corpus", "")),
            )
        except TypeError as e:
            raise CharrnnError(f"config: {e}") from None


def _sub(klass, d, name):
    if not isinstance(d, dict):
        raise CharrnnError(f"config: {name} must be a JSON object")
    known = {f.name for f in dataclasses.fields(klass)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise CharrnnError(f"config: unknown {name} field(s): {', '.join(unknown)}")
    return klass(**d)

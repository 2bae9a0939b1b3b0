"""What a configuration would cost, checked against the machine before anything is allocated.

A config with ``--hidden 100000000`` (typed, or edited into a run's config.json) would
otherwise make XLA abort in C++ or the process swap for minutes. ``check_fits`` estimates the
parameter count and the bytes one training step holds (from the config and the vocabulary
size alone: pure arithmetic, no JAX) and refuses, naming both numbers, what cannot fit in
the machine's physical memory.
"""

from __future__ import annotations

import os
from typing import Optional

from charrnn.config import GATES, ModelConfig, RunConfig
from charrnn.errors import CharrnnError

FLOAT_BYTES = 4


def param_count(model: ModelConfig, vocab_size: int, num_labels: int = 0) -> int:
    """Parameters of the model ``model`` over ``vocab_size`` token ids (weights and biases).

    Per layer: ``w_ih`` (in, G), ``w_hh`` (H, G), ``b_ih`` (G,) and for GRU ``b_hh`` (G,), with
    G = gates * H and ``in`` the vocabulary for the first layer (one-hot input) and H after;
    then the output layer ``w_out`` (H, V) and ``b_out`` (V,). A labelled model (``num_labels``
    > 0) adds its label vectors (num_labels, label_dim) and their rows of the first ``w_ih``.
    """
    hidden, gates = model.hidden, GATES[model.cell] * model.hidden
    label_dim = model.label_dim if num_labels else 0
    total = num_labels * label_dim
    for layer in range(model.layers):
        fan_in = vocab_size + label_dim if layer == 0 else hidden
        total += fan_in * gates + hidden * gates + gates * (2 if model.cell == "gru" else 1)
    return total + hidden * vocab_size + vocab_size


def step_bytes(config: RunConfig, vocab_size: int, training: bool = True, rows: int = 1,
               num_labels: int = 0) -> int:
    """An estimate (within a small factor, on the high side) of the memory one step holds.

    Training: parameters, gradients and two optimizer moments (4 copies), plus per character of
    the batch every layer's saved gate values and states and the logits with their gradient.
    Inference (``training=False``): the parameters and one step's logits and states for each
    of ``rows`` rows.
    """
    m, t = config.model, config.train
    params = param_count(m, vocab_size, num_labels)
    if not training:
        return FLOAT_BYTES * (params + rows * (vocab_size + 4 * m.layers * m.hidden))
    per_char = m.layers * m.hidden * (GATES[m.cell] + 4) + 3 * vocab_size
    return FLOAT_BYTES * (4 * params + t.batch_size * t.seq_len * per_char)


def physical_memory() -> Optional[int]:
    """Bytes of physical memory of this machine, or None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:.3g} EiB"  # unreachable: kept for the type checker


def check_fits(config: RunConfig, vocab_size: int, *, training: bool = True, rows: int = 1, where: str = "",
               memory: Optional[int] = None, num_labels: int = 0) -> None:
    """Refuse (``CharrnnError``) a model or step that cannot fit in this machine's memory.

    ``training``: a train step of ``config.train``'s batch; else inference over ``rows`` rows.
    ``where`` prefixes the message (a config file's path, say); ``memory`` overrides the
    machine's physical memory (tests).
    """
    memory = physical_memory() if memory is None else memory
    if memory is None:
        return
    params = param_count(config.model, vocab_size, num_labels)
    need = step_bytes(config, vocab_size, training, rows, num_labels)
    if need <= memory:
        return
    m, t = config.model, config.train
    what = (f"{m.cell} {m.layers}x{m.hidden} over {vocab_size} tokens, batch {t.batch_size} x {t.seq_len}"
            if training else f"{m.cell} {m.layers}x{m.hidden} over {vocab_size} tokens")
    prefix = f"{where}: " if where else ""
    raise CharrnnError(f"{prefix}{what} has {params:,} parameters and needs about {_size(need)} per "
                       f"{'training ' if training else ''}step; this machine has {_size(memory)} of memory")

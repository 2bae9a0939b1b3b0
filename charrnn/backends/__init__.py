"""How the model is made fast: implementations of ``charrnn.cells``, chosen in one place.

| backend       | serves                                                        | module        |
|---------------|---------------------------------------------------------------|---------------|
| xla           | every cell, dtype and platform: a window (scan with a         | xla           |
|               | hand-written backward) and a sampling step                    |               |
| lstm_window   | LSTM windows on CPUs with AVX-512, float32; bfloat16 where    | lstm_window   |
|               | the bf16 products run on AVX512-BF16                          |               |
| step_kernel   | float32 sampling steps of every cell on CPUs with AVX-512     | step_kernel   |
| bf16_matmul   | bfloat16 products on AMX / AVX512-BF16, inside the others     | bf16_matmul   |

``auto`` (the only policy) takes the first that serves; ``CHARRNN_KERNELS=0`` turns every native
kernel off (XLA's operations run everything), and ``CHARRNN_AMX=0``, ``CHARRNN_LSTM_KERNEL=0``,
``CHARRNN_STEP_KERNEL=0`` one each. Each backend is tested against ``charrnn.cells`` (values and
gradients) in tests/test_backends.py. A new backend is a module here and a line below.
"""

from __future__ import annotations

import jax.numpy as jnp

from charrnn.backends import lstm_window, step_kernel, xla
from charrnn.backends.bf16_matmul import matmul


def training_backend(kind: str, dtype) -> str:
    """The name of the backend that runs a ``kind`` layer's window in ``dtype`` here."""
    if kind == "lstm" and (lstm_window.enabled() if dtype == jnp.float32 else lstm_window.bf16_enabled()):
        return "lstm_window"
    return "xla"


def sampling_backend(dtype) -> str:
    """The name of the backend that runs sampling steps in ``dtype`` here."""
    return "step_kernel" if dtype == jnp.float32 and step_kernel.enabled() else "xla"


def layer(kind: str, p, carry, x, keep_TxBx1, one_hot: bool, dtype=jnp.float32, extra_TxBxG=None):
    """One layer over a window, as ``charrnn.cells.layer`` defines it: ``(final_carry, h_TxBxH)``.

    ``p``: the layer's parameters (``w_ih``, ``w_hh``, ``b_ih``, the GRU's ``b_hh``); ``x``: token
    ids ``(T, B)`` when ``one_hot``, else the layer below's ``(T, B, I)`` output; ``keep_TxBx1``: 0
    where the state is zeroed before the step. ``extra_TxBxG``: a further part of the input
    projection added to ``x @ w_ih`` (a labelled model's label term: the rest of the input
    vector's rows of ``w_ih``); None leaves the program as it was.
    """
    if training_backend(kind, dtype) == "lstm_window":
        xw = jnp.take(p["w_ih"], x, axis=0) if one_hot else matmul(x, p["w_ih"], dtype)
        xw = xw if extra_TxBxG is None else xw + extra_TxBxG
        return lstm_window.layer(p["w_hh"], p["b_ih"], tuple(carry), xw, keep_TxBx1, dtype=dtype)
    return xla.layer(kind, p, carry, x, keep_TxBx1, one_hot, dtype, extra_TxBxG)


def dense(x, w, b, dtype=jnp.float32):
    """``x @ w + b`` in float32 (the output layer), the product in ``dtype``."""
    y = matmul(x, w, dtype)
    return y + xla.bias(b, y)


def prepare_step(kind: str, cells: list, w_out, b_out, dtype=jnp.float32, threads: int = 1):
    """The weights ``step`` reads, prepared once outside a loop of sampling steps; ``threads``:
    how many threads a native step splits its columns over (the result does not depend on it)."""
    if sampling_backend(dtype) == "step_kernel":
        return step_kernel.prepare(kind, cells, w_out, b_out, threads)
    return xla.prepare_step(kind, cells, w_out, b_out, dtype)


def step(kind: str, weights, carry, token_B, dtype=jnp.float32, extra_BxG=None):
    """One step of every layer and the output layer: ``(new_carry, logits_BxV)``. Never resets.
    ``extra_BxG``: a further part of the first layer's input projection (a label term), or None."""
    if sampling_backend(dtype) == "step_kernel":
        return step_kernel.step(weights, carry, token_B, extra_BxG)
    return xla.step(kind, weights, carry, token_B, dtype, extra_BxG)

"""The server's caps: what one request may ask for and how many may run at once."""

from __future__ import annotations

from dataclasses import dataclass

from charrnn.errors import CharrnnError


@dataclass(frozen=True)
class ServeLimits:
    """Caps that keep one client from taking the whole server (each is a ``charrnn serve`` flag).

    ``max_tokens``: characters one completion may generate; ``max_n``: completions per request;
    ``max_prompt``: characters in a prompt; ``max_concurrent``: requests generating at once
    (more get HTTP 429); ``max_body``: bytes in a request body (more get HTTP 413);
    ``default_max_tokens``: what a request that gives no ``max_tokens`` generates;
    ``max_batch``: rows the engine samples at once per model (more wait for a free row).
    """

    max_tokens: int = 4096
    max_n: int = 16
    max_prompt: int = 4096
    max_concurrent: int = 64
    max_body: int = 64 * 1024
    default_max_tokens: int = 256
    max_batch: int = 256

    def __post_init__(self):
        for name in ("max_tokens", "max_n", "max_prompt", "max_concurrent", "max_body", "default_max_tokens",
                     "max_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CharrnnError(f"--{name.replace('_', '-')} must be a positive integer, not {value!r}")
        if self.default_max_tokens > self.max_tokens:
            raise CharrnnError(f"--default-max-tokens ({self.default_max_tokens}) must not exceed "
                               f"--max-tokens ({self.max_tokens})")
        if self.max_n > self.max_batch:
            raise CharrnnError(f"--max-n ({self.max_n}) must not exceed --max-batch ({self.max_batch})")

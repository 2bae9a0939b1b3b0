"""The OpenAI completions wire format: the request body, its checks, and the error shape.

Every refusal is an ``ApiError``, sent as ``{"error": {"message", "type", "param", "code"}}``
with a 4xx status, as OpenAI, vLLM and llama.cpp's server do, so clients raise their own
error types (``openai.BadRequestError``, ``NotFoundError`` ...).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from charrnn import labels as labels_mod
from charrnn.errors import CharrnnError
from charrnn.serve.limits import ServeLimits
from charrnn.vocab import describe_chars

# The seed range ``charrnn.prng.key_from_seed`` accepts.
MAX_SEED = 2 ** 64 - 1


class ApiError(Exception):
    """A request the server refuses: HTTP ``status`` and the OpenAI error fields."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class CompletionRequest(BaseModel):
    """``POST /v1/completions``'s body. Strict types (``"1"`` is not a number, ``true`` is not
    an integer); fields OpenAI has and charrnn does not use are ignored unless they would change
    the answer (``logprobs``, ``best_of``, ``suffix``: refused)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    prompt: str = ""
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    greedy: Optional[bool] = None
    n: Optional[int] = None
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stream: Optional[bool] = None
    stream_options: Optional[dict] = None
    echo: Optional[bool] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    repetition_penalty: Optional[float] = None
    label: Optional[str] = None
    logprobs: Optional[Any] = None
    best_of: Optional[Any] = None
    suffix: Optional[Any] = None
    user: Optional[Any] = Field(default=None)


@dataclass(frozen=True)
class Job:
    """A checked completion request, ready for the engine: ``n`` rows that share a prompt."""

    model: str
    prompt: str
    prompt_ids: Any  # int32 ids of the prompt (without the start token)
    n: int
    max_tokens: int
    temperature: float
    top_k: Optional[int]
    top_p: float
    greedy: bool
    presence: float
    frequency: float
    repetition: float
    seed: int
    stop: tuple[str, ...]
    stream: bool
    echo: bool
    include_usage: bool = False  # stream_options.include_usage: a last event with usage
    # A labelled model's rows: each row's label weights (float32 ``(n, L)``) and the label or mix
    # it is written in (``labels.row_labels``); None and ``(None,) * n`` for an unlabelled model.
    label_weights_NxL: Any = None
    labels: tuple = ()


def _finite(name: str, value: Optional[float]) -> None:
    if value is not None and not math.isfinite(value):
        raise ApiError(400, f"{name} must be a finite number, not {value}", name)


def row_labels(label_vocab: Optional[labels_mod.LabelVocab], label: Optional[str], n: int, seed: int):
    """``labels.row_labels`` for a request: what ``Run.sample`` gives rows seeded ``seed``, or
    ``ApiError`` naming ``label`` (an unknown label, a malformed mix, a label for an unlabelled model)."""
    try:
        return labels_mod.row_labels(label_vocab, label, n, seed, field="label")
    except CharrnnError as e:
        raise ApiError(400, str(e), "label", "invalid_label") from None


def check_request(req: CompletionRequest, vocab, limits: ServeLimits,
                  label_vocab: Optional[labels_mod.LabelVocab] = None) -> Job:
    """The request as a ``Job``, or ``ApiError`` naming the first field that is wrong.

    ``label_vocab``: a labelled model's labels (``Run.labels``), which ``label`` is checked against."""
    if req.logprobs not in (None, 0, False):
        raise ApiError(400, "logprobs is not supported by charrnn's server", "logprobs")
    if req.best_of not in (None, 1):
        raise ApiError(400, "best_of is not supported by charrnn's server (use n)", "best_of")
    if req.suffix not in (None, ""):
        raise ApiError(400, "suffix is not supported by charrnn's server", "suffix")
    if len(req.prompt) > limits.max_prompt:
        raise ApiError(400, f"prompt has {len(req.prompt)} characters; this server's cap is "
                            f"{limits.max_prompt} (--max-prompt)", "prompt", "prompt_too_long")
    missing = vocab.unknown(req.prompt)
    if missing:
        raise ApiError(400, f"prompt has {len(missing)} character(s) not in the model's vocabulary: "
                            f"{describe_chars(missing)}", "prompt", "unknown_characters")
    max_tokens = limits.default_max_tokens if req.max_tokens is None else req.max_tokens
    if max_tokens < 1:
        raise ApiError(400, f"max_tokens must be at least 1, not {max_tokens}", "max_tokens")
    if max_tokens > limits.max_tokens:
        raise ApiError(400, f"max_tokens is {max_tokens}; this server's cap is {limits.max_tokens} "
                            "(--max-tokens)", "max_tokens")
    n = 1 if req.n is None else req.n
    if n < 1:
        raise ApiError(400, f"n must be at least 1, not {n}", "n")
    if n > limits.max_n:
        raise ApiError(400, f"n is {n}; this server's cap is {limits.max_n} (--max-n)", "n")
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        _finite(name, getattr(req, name))
    temperature = 1.0 if req.temperature is None else req.temperature
    if temperature < 0:
        raise ApiError(400, f"temperature must be at least 0, not {temperature}", "temperature")
    top_p = 1.0 if req.top_p is None else req.top_p
    if not 0.0 < top_p <= 1.0:
        raise ApiError(400, f"top_p must be in (0, 1], not {top_p}", "top_p")
    if req.top_k is not None and req.top_k < 1:
        raise ApiError(400, f"top_k must be at least 1, not {req.top_k}", "top_k")
    repetition = 1.0 if req.repetition_penalty is None else req.repetition_penalty
    if repetition <= 0:
        raise ApiError(400, f"repetition_penalty must be greater than 0, not {repetition}", "repetition_penalty")
    if req.seed is not None and not 0 <= req.seed <= MAX_SEED:
        raise ApiError(400, f"seed must be in [0, 2**64), not {req.seed}", "seed")
    stop = () if req.stop is None else ((req.stop,) if isinstance(req.stop, str) else tuple(req.stop))
    if len(stop) > 4:
        raise ApiError(400, f"stop has {len(stop)} strings; at most 4 are allowed", "stop")
    if any(s == "" for s in stop):
        raise ApiError(400, "stop strings must not be empty", "stop")
    seed = req.seed if req.seed is not None else int.from_bytes(os.urandom(8), "little")
    weights_NxL, names = row_labels(label_vocab, req.label, n, seed)
    return Job(model=req.model, prompt=req.prompt, prompt_ids=vocab.encode(req.prompt), n=n,
               max_tokens=max_tokens, temperature=temperature, top_k=req.top_k, top_p=top_p,
               greedy=bool(req.greedy) or temperature == 0.0,
               presence=req.presence_penalty or 0.0, frequency=req.frequency_penalty or 0.0,
               repetition=repetition, seed=seed, stop=stop, stream=bool(req.stream), echo=bool(req.echo),
               include_usage=bool((req.stream_options or {}).get("include_usage")),
               label_weights_NxL=weights_NxL, labels=tuple(names))


# What each field must be, for type errors' messages.
EXPECTED = {"model": "a string", "prompt": "a string", "label": "a string", "stop": "a string or a list of strings",
            "stream": "true or false", "echo": "true or false", "greedy": "true or false",
            "stream_options": "an object", **{f: "an integer" for f in ("max_tokens", "n", "seed", "top_k")},
            **{f: "a number" for f in ("temperature", "top_p", "presence_penalty", "frequency_penalty",
                                       "repetition_penalty")}}


def validation_error(errors: list[dict]) -> ApiError:
    """FastAPI's ``RequestValidationError`` details as one ``ApiError`` naming the field."""
    if not errors:
        return ApiError(400, "invalid request body", None, "invalid_body")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return ApiError(400, "the request body is not valid JSON", None, "invalid_json")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if not loc:
        return ApiError(400, "the request body must be a JSON object (Content-Type: application/json)",
                        None, "invalid_body")
    param = loc[0]
    if first.get("type") == "missing":
        return ApiError(400, f"{param} is required", param, "missing_field")
    if param in EXPECTED:
        value = first.get("input")
        shown = value if isinstance(value, (int, float, bool, type(None))) else type(value).__name__
        if isinstance(value, str):
            shown = repr(value[:40])
        return ApiError(400, f"{param} must be {EXPECTED[param]}, not {shown}", param, "invalid_type")
    return ApiError(400, f"{'.'.join(loc)}: {first.get('msg', 'invalid value')}", param, "invalid_type")

"""The FastAPI app: ``GET /v1/models``, ``POST /v1/completions`` (JSON or server-sent events) and
the playground page at ``/``. ``create_app`` builds it; ``charrnn serve`` runs it with uvicorn."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from importlib import resources
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from charrnn.serve.engine import Completion, Engine
from charrnn.serve.limits import ServeLimits
from charrnn.serve.protocol import ApiError, CompletionRequest, check_request, error_body, validation_error

# How often a request waiting for characters checks whether its client has gone.
DISCONNECT_POLL_S = 0.5


def _error_response(e: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


class BodyLimit:
    """ASGI middleware: a request body over ``max_body`` bytes is refused with 413 before it is
    parsed (by its Content-Length when it has one, else as it arrives)."""

    def __init__(self, app, max_body: int):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = ApiError(413, f"the request body is over this server's cap of {self.max_body} bytes "
                                "(--max-body)", None, "body_too_large")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await _error_response(too_big)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise _BodyTooLarge(too_big)
            return message

        try:
            await self.app(scope, limited, send)
        except _BodyTooLarge as e:
            await _error_response(e.error)(scope, receive, send)


class _BodyTooLarge(Exception):
    def __init__(self, error: ApiError):
        self.error = error


def create_app(runs: dict, limits: ServeLimits = ServeLimits(), api_key: Optional[str] = None,
               chunk: Optional[int] = None, warm_up: bool = False) -> FastAPI:
    """The server for ``runs`` (model id -> ``charrnn.load`` result).

    Each model gets an ``Engine`` (a batched sampling thread), started with the app and stopped
    with it. ``api_key``: when given, every ``/v1`` request needs ``Authorization: Bearer KEY``.
    ``chunk``: characters per engine dispatch; ``warm_up``: compile the common sampler programs
    as the engines start (requests that arrive meanwhile wait for it).
    """
    engines = {name: Engine(run, limits.max_batch, **({"chunk": chunk} if chunk else {}))
               for name, run in runs.items()}
    created = int(time.time())
    active = {"requests": 0}

    @asynccontextmanager
    async def lifespan(app):
        for e in engines.values():
            e.start(warm_up)
        try:
            yield
        finally:
            for e in engines.values():
                await asyncio.to_thread(e.stop)

    app = FastAPI(title="charrnn", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, max_body=limits.max_body)
    app.state.engines = engines
    app.state.active = active
    app.state.limits = limits

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        return _error_response(validation_error(list(e.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        message = {404: f"no route {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return JSONResponse(error_body(message, "invalid_request_error", None, kind), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _bug(request, e: Exception):  # never a traceback to the client
        return JSONResponse(error_body(f"internal error: {type(e).__name__}", "server_error"), status_code=500)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                           None, "invalid_api_key")

    @app.get("/", include_in_schema=False)
    async def playground():
        page = resources.files("charrnn.serve").joinpath("static/index.html").read_text(encoding="utf-8")
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    def describe(name: str) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "charrnn",
                "meta": _model_meta(runs[name])}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [describe(name) for name in runs]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str, request: Request):
        authorize(request)
        if model_id not in runs:
            raise ApiError(404, f"the model {model_id!r} does not exist", "model", "model_not_found")
        return describe(model_id)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        authorize(request)
        if body.model not in engines:
            raise ApiError(404, f"the model {body.model!r} does not exist; this server has: "
                                f"{', '.join(sorted(engines))}", "model", "model_not_found")
        engine = engines[body.model]
        job = check_request(body, engine.run.vocab, limits, engine.run.labels)
        if active["requests"] >= limits.max_concurrent:
            raise ApiError(429, f"this server is already generating {limits.max_concurrent} requests "
                                "(--max-concurrent); retry shortly", None, "too_many_requests",
                           type="rate_limit_error")
        active["requests"] += 1
        completion = Completion(job, asyncio.get_running_loop())
        engine.submit(completion)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
        if job.stream:
            return _EventStream(_stream(completion, meta), completion, active)
        try:
            return await _collect(completion, meta, request)
        finally:
            completion.cancel()
            active["requests"] -= 1

    return app


def _model_meta(run) -> dict:
    """What ``GET /v1/models`` tells about a run; a labelled run's labels with their training
    document counts (what a request's ``label`` may name, and the proportions rows draw from)."""
    c = run.config.model
    meta = {"cell": c.cell, "layers": c.layers, "hidden": c.hidden, "vocab_size": run.vocab.size, "step": run.step}
    if run.labels is not None:
        meta["labels"] = [{"name": n, "documents": k} for n, k in zip(run.labels.names, run.labels.counts)]
    return meta


def _choice(job, index: int, text: str, finish: Optional[str]) -> dict:
    """One choice; a labelled model's carries ``label``, the label or mix its row is written in
    (an extra key: OpenAI's clients keep it, as ``choice.model_extra["label"]`` in ``openai``)."""
    choice = {"text": text, "index": index, "finish_reason": finish, "logprobs": None}
    label = job.labels[index] if job.labels else None
    if label is not None:
        choice["label"] = label
    return choice


async def _collect(completion: Completion, meta: dict, request: Request):
    """Wait for every row of a non-streamed request; give its rows up if the client goes away."""
    job = completion.job
    texts, finish = [""] * job.n, [None] * job.n
    while True:
        try:
            items = await asyncio.wait_for(completion.events.get(), DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                completion.cancel()
                return JSONResponse(error_body("client disconnected"), status_code=499)
            continue
        if items is None:
            break
        for index, text, reason in items:
            texts[index] += text
            finish[index] = reason or finish[index]
    if completion.error:
        return JSONResponse(error_body(completion.error, "server_error"), status_code=503)
    used = sum(len(t) for t in texts)
    prefix = job.prompt if job.echo else ""
    return {**meta, "object": "text_completion",
            "choices": [_choice(job, i, prefix + t, f or "length") for i, (t, f) in enumerate(zip(texts, finish))],
            "usage": _usage(job, used)}


def _usage(job, completion_chars: int) -> dict:
    """Token counts in characters (the model's tokens); the prompt is counted once, as OpenAI does."""
    return {"prompt_tokens": len(job.prompt), "completion_tokens": completion_chars,
            "total_tokens": len(job.prompt) + completion_chars}


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


class _EventStream(StreamingResponse):
    """A server-sent event stream that frees its request however it ends: finished, client
    gone (even before the first event), or cancelled by a shutdown."""

    def __init__(self, events, completion: Completion, active: dict):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.completion, self.active = completion, active

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.completion.cancel()
            self.active["requests"] -= 1


async def _stream(completion: Completion, meta: dict):
    """Server-sent events: one ``text_completion`` chunk per row per engine chunk, a last chunk
    per row with its ``finish_reason``, then ``data: [DONE]``. Closing the connection cancels."""
    job = completion.job
    base = {**meta, "object": "text_completion"}
    used = 0
    try:
        if job.echo and job.prompt:
            for i in range(job.n):
                yield _sse({**base, "choices": [_choice(job, i, job.prompt, None)]})
        while True:
            items = await completion.events.get()
            if items is None:
                break
            # One choice per event, as OpenAI streams: clients often read only choices[0].
            for index, text, reason in items:
                used += len(text)
                yield _sse({**base, "choices": [_choice(job, index, text, reason)]})
        if completion.error:
            yield _sse(error_body(completion.error, "server_error"))
        elif job.include_usage:
            yield _sse({**base, "choices": [], "usage": _usage(job, used)})
        yield b"data: [DONE]\n\n"
    finally:
        completion.cancel()

"""`dgrt serve`: the OpenAI API over continuous block-diffusion batching (dgrt.runtime.batching).

    app = create_app(dgrt.load("export-dir"), model_name="reverse", max_batch=8)
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: POST /v1/chat/completions and /v1/completions (OpenAI's request and response schema; `stream`
sends Server-Sent Events, a delta per committed canvas, and with `drafts: true` every refining draft as a
chunk with a `dgrt` field), GET /v1/models, /health and /metrics (Prometheus), and at / a playground page
that shows the canvas refining. Errors are OpenAI's error JSON. With an API key, /v1/* and /metrics need
`Authorization: Bearer KEY`.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dgrt.errors import DgrtError
from dgrt.runtime.batching import Batcher, Job, Observer, Update
from dgrt.runtime.generator import Generator
from dgrt.serve.protocol import ChatCompletionRequest, CompletionRequest

DEFAULT_MAX_BODY = 1 << 20  # bytes of a request body
PLAYGROUND = resources.files("dgrt.serve").joinpath("playground.html").read_text(encoding="utf-8")
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ApiError(Exception):
    """An error answered as OpenAI's error JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


class Metrics(Observer):
    """The server's Prometheus metrics; also the batcher's observer."""

    def __init__(self, batcher: Callable[[], Batcher | None]):
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "dgrt_requests",
            "Generation requests ended, by endpoint and status (499: the client left)",
            ["endpoint", "status"],
            registry=r,
        )
        self.errors = Counter("dgrt_request_errors", "Requests that failed, by error type", ["type"], registry=r)
        self.tokens = Counter("dgrt_generated_tokens", "Completion tokens sent (rate() gives tokens/s)", registry=r)
        self.prompt_tokens = Counter("dgrt_prompt_tokens", "Prompt tokens prefilled", registry=r)
        queue = Gauge("dgrt_queue_depth", "Requests waiting to join a batch", registry=r)
        queue.set_function(lambda: float(b.queue_depth) if (b := batcher()) else 0.0)
        rows = Gauge("dgrt_batch_occupancy", "Rows in the running batch", registry=r)
        rows.set_function(lambda: float(b.occupancy) if (b := batcher()) else 0.0)
        self.prefill_seconds = Histogram(
            "dgrt_prefill_seconds", "Prefill call latency", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.step_seconds = Histogram(
            "dgrt_denoise_step_seconds", "Denoise step latency (a whole batch)", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.batch_rows = Histogram(
            "dgrt_denoise_step_rows", "Rows per denoise step", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )
        self.steps = Histogram(
            "dgrt_steps_per_canvas",
            "Denoise steps a row took per canvas",
            buckets=(1, 2, 4, 8, 16, 24, 32, 48, 64, 128),
            registry=r,
        )
        self.latency = Histogram(
            "dgrt_request_seconds", "Request latency, arrival to last token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.first_canvas = Histogram(
            "dgrt_first_canvas_seconds", "Arrival to the first committed canvas", buckets=_LATENCY_BUCKETS, registry=r
        )

    def prefill(self, seconds: float, rows: int) -> None:
        self.prefill_seconds.observe(seconds)

    def step(self, seconds: float, rows: int) -> None:
        self.step_seconds.observe(seconds)
        self.batch_rows.observe(rows)

    def canvas(self, steps: int) -> None:
        self.steps.observe(steps)


@dataclass(frozen=True)
class _Endpoint:
    """What differs between the chat and the completions endpoints."""

    name: str
    object: str
    id_prefix: str
    chat: bool

    def choice(self, text: str, finish_reason: str | None, delta: bool) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        key = "delta" if delta else "message"
        body = {"content": text} if delta else {"role": "assistant", "content": text}
        return {"index": 0, key: body, "finish_reason": finish_reason}


CHAT = _Endpoint("chat.completions", "chat.completion", "chatcmpl-", chat=True)
COMPLETIONS = _Endpoint("completions", "text_completion", "cmpl-", chat=False)


def create_app(
    gen: Generator,
    model_name: str,
    *,
    max_batch: int = 8,
    max_context: int | None = None,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    owns_generator: bool = False,
) -> FastAPI:
    """The ASGI app serving `gen` as `model_name`. The batcher starts with the app and stops with it
    (closing `gen` too when `owns_generator`)."""
    state: dict[str, Batcher | None] = {"batcher": None}
    metrics = Metrics(lambda: state["batcher"])
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state["batcher"] = Batcher(gen, max_batch=max_batch, max_context=max_context, observer=metrics)
        try:
            yield
        finally:
            batcher, state["batcher"] = state["batcher"], None
            if batcher is not None:
                await asyncio.to_thread(batcher.close)
            if owns_generator:
                gen.close()

    app = FastAPI(title="dgrt", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(_BodyLimit, limit=max_body_bytes)
    server_id = f"{socket.gethostname()}:{os.getpid()}"  # which replica answered, behind a load balancer

    @app.middleware("http")
    async def identify(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        response.headers["x-dgrt-server"] = server_id
        return response

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            message = "Incorrect or missing API key: send 'Authorization: Bearer <key>'."
            raise ApiError(401, message, code="invalid_api_key")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        metrics.errors.labels(exc.kind).inc()
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return await api_error(request, _validation_error(exc.errors()))

    @app.get("/", include_in_schema=False)
    async def playground() -> HTMLResponse:
        return HTMLResponse(PLAYGROUND)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok" if state["batcher"] is not None else "starting"}

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        authorize(request)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "dgrt"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> Response:
        authorize(request)
        body = await _parse(request, ChatCompletionRequest)
        return await complete(request, CHAT, body, body.prompt())

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Response:
        authorize(request)
        body = await _parse(request, CompletionRequest)
        return await complete(request, COMPLETIONS, body, body.prompt_value())

    async def complete(request: Request, endpoint: _Endpoint, body: Any, prompt: Any) -> Response:
        if body.model != model_name:
            message = f"The model '{body.model}' does not exist; this server serves '{model_name}'."
            raise ApiError(404, message, param="model", code="model_not_found")
        batcher = state["batcher"]
        if batcher is None:
            raise ApiError(503, "The server is not running.", "server_error")
        limit, context = body.token_limit(), gen.info.max_context
        if limit is not None and limit > context:
            raise ApiError(
                400, f"'max_tokens' is {limit}; this model's context holds {context} tokens.", param="max_tokens"
            )
        loop, updates = asyncio.get_running_loop(), asyncio.Queue[Update]()
        try:
            stops = body.stop_strings()
            job = await asyncio.to_thread(
                Job.create,
                gen,
                prompt,
                chat=endpoint.chat,
                max_new_tokens=limit,
                seed=body.seed,
                stop=stops,
                drafts=body.drafts and body.stream,
                listener=lambda u: loop.call_soon_threadsafe(updates.put_nowait, u),
                **body.sampler_settings(),
            )
            batcher.submit(job)
        except (DgrtError, ValueError) as e:
            raise ApiError(400, str(e)) from None
        metrics.prompt_tokens.inc(job.prompt_tokens)
        reply = _Reply(endpoint, model_name, job, body, metrics)
        if body.stream:
            return StreamingResponse(reply.events(updates), media_type="text/event-stream")
        return await reply.whole(updates, request)

    return app


class _Reply:
    """One request's answer, whole or streamed; counts its tokens and latency, and cancels the job when
    the client goes away."""

    def __init__(self, endpoint: _Endpoint, model: str, job: Job, body: Any, metrics: Metrics):
        self.endpoint, self.model, self.job, self.body, self.metrics = endpoint, model, job, body, metrics
        self.id = endpoint.id_prefix + uuid.uuid4().hex
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        obj = "chat.completion.chunk" if self.endpoint.chat else "text_completion"
        return _sse(self._head(obj) | {"choices": choices} | extra)

    def _usage(self) -> dict[str, int]:
        done = len(self.job.tokens)
        return {
            "prompt_tokens": self.job.prompt_tokens,
            "completion_tokens": done,
            "total_tokens": self.job.prompt_tokens + done,
        }

    def _finished(self, update: Update) -> None:
        failure = _failure(update)
        status = 200 if failure is None else failure.status
        self.metrics.requests.labels(self.endpoint.name, str(status)).inc()
        self.metrics.tokens.inc(len(self.job.tokens))
        self.metrics.latency.observe(time.perf_counter() - self.job.submitted)
        if self.job.first_canvas_seconds is not None:
            self.metrics.first_canvas.observe(self.job.first_canvas_seconds)

    async def whole(self, updates: asyncio.Queue[Update], request: Request) -> Response:
        try:
            while True:
                try:
                    update = await asyncio.wait_for(updates.get(), timeout=0.5)
                except TimeoutError:
                    if await request.is_disconnected():
                        return Response(status_code=499)
                    continue
                if update.kind == "done":
                    break
        finally:
            if not self.job.finished:  # the client left (or the handler was cancelled): free the row
                self.job.cancel()
                self.metrics.requests.labels(self.endpoint.name, "499").inc()
        self._finished(update)
        failure = _failure(update)
        if failure is not None:
            raise failure
        body = self._head(self.endpoint.object)
        body["choices"] = [self.endpoint.choice(update.text, update.finish_reason, delta=False)]
        body["usage"] = self._usage()
        return JSONResponse(body)

    async def events(self, updates: asyncio.Queue[Update]) -> AsyncIterator[str]:
        """SSE chunks: a delta per canvas (the first one opens the assistant's message), drafts when asked,
        the finish reason, usage when asked, then [DONE]. A client that leaves cancels the job."""
        sent = ""
        try:
            if self.endpoint.chat:
                opening = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                yield self._chunk([opening])
            while True:
                update = await updates.get()
                if update.kind == "draft":
                    draft = {"draft": update.text, "canvas": update.canvas_index, "step": update.step}
                    yield self._chunk([], dgrt=draft | {"tokens": update.pieces, "accepted": update.accepted})
                    continue
                failure = _failure(update)
                if failure is not None:
                    self._finished(update)
                    yield _sse(failure.body())
                    return
                delta, sent = update.text[len(sent) :] if update.text.startswith(sent) else update.text, update.text
                reason = update.finish_reason if update.kind == "done" else None
                if delta or reason:
                    yield self._chunk([self.endpoint.choice(delta, reason, delta=True)])
                if update.kind == "done":
                    self._finished(update)
                    break
            options = self.body.stream_options
            if options is not None and options.include_usage:
                yield self._chunk([], usage=self._usage())
            yield "data: [DONE]\n\n"
        finally:
            if not self.job.finished:  # the client left: its row leaves at the next canvas boundary
                self.job.cancel()
                self.metrics.requests.labels(self.endpoint.name, "499").inc()


def _failure(update: Update) -> ApiError | None:
    """The error a finished job's client gets, if it did not finish with an answer."""
    if update.kind != "done" or update.finish_reason in ("stop", "length"):
        return None
    if update.finish_reason == "error":
        return ApiError(500, f"Generation failed: {update.error}", "server_error")
    return ApiError(503, "The server stopped before the answer was finished.", "server_error")


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


async def _parse(request: Request, schema: type[Any]) -> Any:
    try:
        raw = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "The request body is not valid JSON.") from None
    try:
        return schema.model_validate(raw)
    except ValidationError as e:
        raise _validation_error(e.errors()) from None


def _validation_error(errors: Any) -> ApiError:
    """The first problem of a request, in one sentence naming the field."""
    first = errors[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    if first.get("type") == "extra_forbidden":
        message = (
            f"Unsupported field '{where}'. dgrt serves block diffusion: its sampler takes steps, t_min, t_max, "
            "entropy_bound, stability_threshold and confidence_threshold."
        )
        return ApiError(400, message, param=where)
    return ApiError(400, f"Invalid '{where}': {first.get('msg', 'invalid value')}.", param=where or None)


class _BodyLimit:
    """Refuses a request body over `limit` bytes with 413, whether it says its length or streams."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        too_large = ApiError(413, f"The request body is over {self.limit} bytes.")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await too_large.response()(scope, receive, send)
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise too_large
            return message

        await self.app(scope, limited, send)

"""The OpenAI-compatible HTTP API over a ``BatchEngine``, and the chat page, as a FastAPI app.

    GET  /                       the chat page (assets/chat.html, .css, .js)
    GET  /health                 {"status": "ok"} and the batch's load
    GET  /v1/models              the one model served
    POST /v1/chat/completions    messages laid out by generation/chat.py
    POST /v1/completions         a prompt continued

Every error is OpenAI's error object: bad input a 400 (404 for an unknown model, 413 for a body too
large, 401 without the API key), a full queue 429, a shutting-down server 503; a bug in the server
answers 500 in the same form, with the traceback only in the server's log. A request becomes ``n`` engine requests
(one per answer, the i-th seeded ``seed + i``); the engine's thread hands their tokens to this
event loop through an ``asyncio.Queue``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from buildllm.errors import UserError
from buildllm.generation.chat import (
    chat_ids,
    chat_prompt,
    prompt_ids,
    stop_ids,
    stop_strings,
)
from buildllm.serve import batching
from buildllm.serve.config import ServeConfig
from buildllm.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    SamplingBody,
)
from buildllm.serve.text import TextOutput

log = logging.getLogger(__name__)
TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict"}
PAGE = {"/": ("chat.html", "text/html"), "/chat.css": ("chat.css", "text/css"),
        "/chat.js": ("chat.js", "text/javascript")}


@dataclass
class Answer:
    """One of a request's ``n`` answers: its engine request and its text so far."""

    request: batching.Request
    text: TextOutput
    finish_reason: str | None = None


class Completions:
    """Turns a checked request body into engine requests and their answers into OpenAI's objects."""

    def __init__(self, loaded, engine: batching.BatchEngine, config: ServeConfig, model_name: str):
        self.tokenizer, self.prompt_template = loaded.tokenizer, loaded.prompt_template
        self.engine, self.config, self.model_name = engine, config, model_name

    def prompt_of(self, body: ChatRequest | CompletionRequest) -> tuple[list[list[int]], list[str], str]:
        """The prompts' token ids, the stop strings, and the name of the field the prompt came in."""
        stops = body.stop_strings()
        if isinstance(body, ChatRequest):
            messages = [m.as_dict() for m in body.messages]
            try:
                text = chat_prompt(messages, self.tokenizer, self.prompt_template)
            except UserError as e:
                raise APIError(400, str(e), param="messages") from None
            return [chat_ids(text, self.tokenizer)], stops + stop_strings(self.tokenizer, self.prompt_template), "messages"
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        # As buildllm generate starts them: bos first where the tokenizer has one; an empty prompt
        # starts a new document.
        return [prompt_ids(self.tokenizer, p) for p in prompts], stops, "prompt"

    def fit(self, ids: list[int], max_tokens: int | None, param: str) -> tuple[list[int], int]:
        """The prompt and max_tokens so that both fit the context: max_tokens is capped; a prompt
        that leaves no room is refused, or cropped to its end with ``crop_prompts``."""
        capacity = self.engine.capacity
        wanted = max_tokens or self.config.max_tokens
        if len(ids) >= capacity:
            if not self.config.crop_prompts:
                raise APIError(400, f"the prompt has {len(ids)} tokens but the context holds {capacity}, answer "
                               "included: shorten it (or start the server with --crop-prompts)",
                               param=param, code="context_length_exceeded")
            ids = ids[-(capacity - min(wanted, capacity - 1)):]
        return ids, min(wanted, capacity - len(ids))

    def start(self, body: ChatRequest | CompletionRequest) -> tuple[list[Answer], int, asyncio.Queue]:
        """Submit the request's answers to the engine; returns them, the prompt tokens and their queue."""
        if body.model != self.model_name:
            raise APIError(404, f"the model {body.model!r} does not exist: this server serves {self.model_name!r}",
                           param="model", code="model_not_found")
        if body.n > self.config.max_n:
            raise APIError(400, f"n must be at most {self.config.max_n}, got {body.n}", param="n")
        prompts, stops, param = self.prompt_of(body)
        max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        answers, prompt_tokens = [], 0
        for ids in prompts:
            ids, limit = self.fit(ids, max_tokens, param)
            prompt_tokens += len(ids)
            for _ in range(body.n):
                i = len(answers)
                # Each answer has its own seed, so n answers differ and each is reproducible alone.
                seed = None if body.seed is None else body.seed + i
                sampling = batching.Sampling(limit, body.temperature, body.top_k, body.top_p, seed,
                                             stop_ids(self.tokenizer))

                def listener(token, reason, i=i):
                    loop.call_soon_threadsafe(queue.put_nowait, (i, token, reason))

                request = batching.Request(ids, sampling, listener)
                answers.append(Answer(request, TextOutput(self.tokenizer, ids, stops, sampling.stop_ids)))
        try:
            self.engine.submit([a.request for a in answers])
        except batching.QueueFull as e:
            raise APIError(429, str(e), type="server_busy", code="queue_full") from None
        except batching.EngineClosed as e:
            raise APIError(503, str(e), type="server_shutting_down") from None
        return answers, prompt_tokens, queue

    async def pieces(self, answers: list[Answer], queue: asyncio.Queue) -> AsyncIterator[tuple[int, str, str | None]]:
        """``(answer index, new text, finish reason or None)`` as the engine produces tokens.

        However this ends (done, the client gone, the task cancelled), answers still running are
        cancelled, which frees their slots.
        """
        running = len(answers)
        try:
            while running:
                i, token, reason = await queue.get()
                a = answers[i]
                if a.finish_reason is not None:
                    continue  # a stop string ended it already; the engine's last words do not count
                piece = a.text.add(token) if token is not None else ""
                if reason in ("cancelled", "error"):
                    raise APIError(503 if reason == "cancelled" else 500,
                                   "the server is shutting down" if reason == "cancelled" else "generation failed",
                                   type="server_error")
                if a.text.stopped:
                    a.finish_reason = "stop"
                elif reason is not None:
                    piece += a.text.finish()
                    a.finish_reason = reason
                if a.finish_reason is not None:
                    running -= 1
                    if reason is None:  # a stop string: no more tokens wanted
                        self.engine.cancel(a.request)
                if piece or a.finish_reason:
                    yield i, piece, a.finish_reason
        finally:
            for a in answers:
                if a.request.finish_reason is None:
                    self.engine.cancel(a.request)

    def usage(self, answers: list[Answer], prompt_tokens: int) -> dict:
        completion = sum(a.text.tokens for a in answers)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}


# The routes --------------------------------------------------------------------------------------


def create_app(loaded, config: ServeConfig | None = None, model_name: str | None = None) -> FastAPI:
    """The app serving ``loaded`` (``load_model``'s result). Its lifespan starts the engine's
    thread and, at shutdown, closes it (what still runs is cancelled)."""
    config = config or ServeConfig()
    config.check()
    model_name = model_name or config.model_name or "buildllm"
    engine = batching.BatchEngine(loaded.model, config.max_batch, config.max_queue, config.context)
    completions = Completions(loaded, engine, config, model_name)

    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.close)

    app = FastAPI(title="buildllm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.model_name = engine, model_name
    _add_error_handlers(app)
    if config.cors_origin:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origin), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(BodyLimit, limit=config.max_body)

    @app.get("/health")
    def health():
        return {"status": "ok", "model": model_name, **engine.stats()}

    for path, (name, media_type) in PAGE.items():
        content = resources.files("buildllm").joinpath("assets", name).read_bytes()
        app.add_api_route(path, lambda content=content, media_type=media_type: Response(content, media_type=media_type),
                          methods=["GET"], include_in_schema=False)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_key_check(config.api_key))])
    card = {"id": model_name, "object": "model", "created": int(time.time()), "owned_by": "buildllm",
            "context_length": engine.capacity}  # created: when this server loaded it

    @v1.get("/models")
    def models():
        return {"object": "list", "data": [card]}

    @v1.get("/models/{name}")
    def model(name: str):
        if name != model_name:
            raise APIError(404, f"the model {name!r} does not exist", param="model", code="model_not_found")
        return card

    @v1.post("/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        return await _respond(completions, body, request, chat=True)

    @v1.post("/completions")
    async def complete(body: CompletionRequest, request: Request):
        return await _respond(completions, body, request, chat=False)

    app.include_router(v1)
    return app


async def _respond(completions: Completions, body: SamplingBody, request: Request, chat: bool):
    answers, prompt_tokens, queue = completions.start(body)
    head = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, "created": int(time.time()),
            "model": completions.model_name}
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        events = _stream(completions, answers, queue, head, chat, prompt_tokens if usage else None)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    texts = [""] * len(answers)

    async def collect():
        async for i, piece, _ in completions.pieces(answers, queue):
            texts[i] += piece

    if not await _unless_disconnected(collect(), request):
        return Response(status_code=499)  # (nobody reads it: the client has gone)
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                    "finish_reason": a.finish_reason} for i, (a, t) in enumerate(zip(answers, texts))]
    else:
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": a.finish_reason}
                   for i, (a, t) in enumerate(zip(answers, texts))]
    return {**head, "object": "chat.completion" if chat else "text_completion", "choices": choices,
            "usage": completions.usage(answers, prompt_tokens)}


async def _stream(completions, answers, queue, head, chat: bool, prompt_tokens: int | None) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending ``data: [DONE]``."""
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
    extra = {"usage": None} if prompt_tokens is not None else {}

    def event(choices: list[dict], **more) -> str:
        return f"data: {json.dumps({**head, 'choices': choices, **extra, **more})}\n\n"

    def choice(i: int, piece: str | None, finish: str | None) -> dict:
        if chat:
            delta = {} if piece is None else {"content": piece}
            return {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": i, "text": piece or "", "logprobs": None, "finish_reason": finish}

    try:
        if chat:  # the first chunk of each answer names the role
            yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(len(answers))])
        async for i, piece, finish in completions.pieces(answers, queue):
            if piece:
                yield event([choice(i, piece, None)])
            if finish:
                yield event([choice(i, None, finish)])
        if prompt_tokens is not None:
            yield event([], usage=completions.usage(answers, prompt_tokens))
    except APIError as e:  # the status line is sent already: the error goes in the stream
        yield f"data: {json.dumps(e.body())}\n\n"
    yield "data: [DONE]\n\n"


async def _unless_disconnected(work, request: Request) -> bool:
    """Run ``work`` while the client waits for it; if the client hangs up first (a streaming one is
    noticed by the response itself), cancel it, which frees its slots, and return False."""
    task = asyncio.ensure_future(work)
    while not (await asyncio.wait({task}, timeout=0.25))[0]:
        if await request.is_disconnected():
            task.cancel()
            return False
    task.result()  # its exception, if it raised one
    return True


def _key_check(api_key: str | None):
    """A dependency that lets a request through only with ``Authorization: Bearer <api_key>``."""
    expected = f"Bearer {api_key}".encode()

    def check(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):  # constant time: no guessing the key by timing
            raise APIError(401, "a valid API key is required: send 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    return check


def _add_error_handlers(app: FastAPI) -> None:
    def answer(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return answer(e)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        first = e.errors()[0]
        # The field's path, without "body" and the names pydantic gives a union's members ("float").
        where = [str(p) for p in first.get("loc", ()) if isinstance(p, int) or (p != "body" and p.isidentifier()
                                                                                and p not in TYPE_NAMES)]
        if first.get("type") == "json_invalid":
            return answer(APIError(400, "the body is not valid JSON: " + first.get("msg", "")))
        field = ".".join(where) or None
        message = f"{field}: {first.get('msg')}" if field else str(first.get("msg"))
        return answer(APIError(400, message, param=field))

    @app.exception_handler(UserError)
    async def user_error(request, e: UserError):
        return answer(APIError(400, str(e)))

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return answer(APIError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def bug(request, e: Exception):
        log.exception("unexpected error")
        return answer(APIError(500, "internal error (see the server's log)", type="server_error"))


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413 before any route reads it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > self.limit
        chunks, size = [], 0
        while not too_big:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            too_big = size > self.limit
            if not message.get("more_body"):
                break
        if too_big:
            error = APIError(413, f"the request body is over {self.limit} bytes", code="request_too_large")
            return await JSONResponse(error.body(), status_code=413)(scope, receive, send)
        body, replayed = b"".join(chunks), False

        async def replay():  # the body once, then the client's later messages (a disconnect)
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

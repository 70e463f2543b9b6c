"""The HTTP application: OpenAI's completions and chat completions over one Model and one Engine.

Handlers run on the asyncio loop and never block it: prompts are tokenized in a worker thread,
generations run in the engine's thread, and their events reach the loop through `Request.events()`.
A client that goes away cancels its generations: a streamed response ends when the connection
does (Starlette's StreamingResponse cancels the body, which leaves `Request.events()`, which
cancels the engine request); a whole response waits for its generations and for the client's
disconnect message at once, and cancels the generations if the disconnect comes first.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..engine import Engine, Request as EngineRequest
from ..errors import EngineClosedError, NeoedgeError, PromptError, QueueFullError
from ..events import Completion, TokenEvent
from ..model import Model
from .responses import FINISH, ChatShape, Choice, TextShape, _Shape
from .schema import ApiError, ChatRequest, CompletionRequest, Prompt, Sampling, bad, parse_chat, parse_completion
from .settings import ServeSettings
from .tokens import TokenPieces

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1
"""What a refused client is told to wait (a generation of a few hundred tokens takes seconds)."""


@dataclass
class Job:
    """One generation of a request: the engine's handle and what the client has been sent of it."""

    request: EngineRequest
    choice: Choice


class Service:
    """What the handlers share: the model, the engine (started with the app), the settings."""

    def __init__(self, model: Model, settings: ServeSettings) -> None:
        self.model = model
        self.settings = settings
        self.name = settings.model_name or model.package_dir.resolve().name
        self.fingerprint = f"fp_{model.fingerprint[:12]}"
        self.pieces = TokenPieces(model.tokenizer)
        context = model.info.context_length
        limits = settings.limits
        self.max_prompt_tokens = limits.max_prompt_tokens or context - 1
        self.max_tokens = limits.max_tokens or context
        if self.max_prompt_tokens >= context:
            raise ValueError(f"max_prompt_tokens ({self.max_prompt_tokens}) must be below the model's context "
                             f"({context}): a reply needs room")
        self.default_max_tokens = min(model.options().max_new_tokens, self.max_tokens)
        self.created = int(time.time())
        self._key = settings.api_key.encode() if settings.api_key else None
        self.engine: Engine | None = None

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        self.engine = Engine(self.model, self.settings.engine)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()

    # -- checks -------------------------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        if self._key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "You didn't provide an API key: send 'Authorization: Bearer <key>'.",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(token.strip().encode(), self._key):
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    async def read_json(self, request: Request) -> Any:
        limit = self.settings.limits.max_body_bytes
        declared = request.headers.get("content-length")
        too_big = ApiError(413, f"The request body is larger than this server accepts ({limit} bytes).",
                           code="request_too_large")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_big
        body = bytearray()
        try:
            async for part in request.stream():
                body += part
                if len(body) > limit:
                    raise too_big
        except ClientDisconnect:
            raise ApiError(400, "The client went away while sending the request.") from None
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise bad(None, f"We could not parse the JSON body of your request ({exc}).") from None
        except RecursionError:
            raise bad(None, "The JSON body of your request is nested too deeply to parse.") from None
        except ValueError as exc:  # e.g. an integer beyond Python's digit limit
            raise bad(None, f"We could not parse the JSON body of your request ({exc}).") from None

    def encode(self, prompts: tuple[Prompt, ...], param: str = "prompt") -> list[list[int]]:
        """Token ids of each prompt (runs in a worker thread: a long text takes a while)."""
        out = []
        for prompt in prompts:
            try:
                ids = self.model.encode(prompt) if isinstance(prompt, str) else self.model.check_tokens(list(prompt), "prompt")
            except PromptError as exc:
                raise bad(param, f"'{param}': {exc}") from None
            ids = ids or [self.model.info.bos_token_id]  # as the engine does: an empty prompt starts at eos
            if len(ids) > self.max_prompt_tokens:
                raise bad(param, f"The prompt is {len(ids)} tokens; this server's limit is {self.max_prompt_tokens} "
                          f"(the model's context is {self.model.info.context_length} tokens).",
                          code="context_length_exceeded")
            out.append(ids)
        return out

    # -- generations ----------------------------------------------------------------------------------
    def submit(self, prompts: list[list[int]], sampling: Sampling, choices: Callable[[int, int], Choice],
               **options: Any) -> list[Job]:
        """`n` generations per prompt, all queued or none: a full queue cancels those already queued."""
        if self.engine is None:
            raise ApiError(503, "The server is starting or stopping.", type="server_error", code="unavailable")
        jobs: list[Job] = []
        try:
            for p, ids in enumerate(prompts):
                for j in range(sampling.n):
                    overrides = sampling.overrides(j)
                    overrides["max_new_tokens"] = overrides["max_new_tokens"] or self.default_max_tokens
                    try:
                        opts = self.model.options(**overrides, **options)
                    except ValueError as exc:
                        raise bad(None, str(exc)) from None
                    jobs.append(Job(self.engine.submit(ids, opts), choices(len(jobs), p)))
        except QueueFullError:
            for job in jobs:
                job.request.cancel()
            raise ApiError(503, "The server is busy: its queue of waiting requests is full. Retry shortly.",
                           type="server_error", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except EngineClosedError:
            for job in jobs:
                job.request.cancel()
            raise ApiError(503, "The server is shutting down.", type="server_error", code="unavailable") from None
        except BaseException:
            for job in jobs:
                job.request.cancel()
            raise
        return jobs

    async def respond(self, request: Request, jobs: list[Job], shape: _Shape, stream: bool) -> Response:
        if stream:
            return StreamingResponse(self._stream(jobs, shape), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            done = await _until_disconnect(request, self._collect(jobs))
        except (NeoedgeError, RuntimeError) as exc:
            raise _failure(exc) from None
        if done is None:  # the client left; its generations were cancelled
            return Response(status_code=499)
        return JSONResponse(shape.body(done))

    async def _collect(self, jobs: list[Job]) -> list[tuple[Choice, Completion]]:
        async def one(job: Job) -> tuple[Choice, Completion]:
            async for event in job.request.events():
                job.choice.feed(event)
            return job.choice, job.request.result(timeout=0)

        return await _all(one(job) for job in jobs)

    async def _stream(self, jobs: list[Job], shape: _Shape) -> AsyncIterator[bytes]:
        inbox: asyncio.Queue[tuple[Job, Any]] = asyncio.Queue()

        async def pump(job: Job) -> None:
            try:
                async for event in job.request.events():
                    inbox.put_nowait((job, event))
                inbox.put_nowait((job, job.request.result(timeout=0)))
            except Exception as exc:  # handed to the stream, which reports it to the client
                inbox.put_nowait((job, exc))

        tasks = [asyncio.create_task(pump(job)) for job in jobs]
        try:
            for job in jobs:
                opening = shape.start(job.choice)
                if opening is not None:
                    yield _sse(shape.chunk([opening]))
            done: list[tuple[Choice, Completion]] = []
            while len(done) < len(jobs):
                job, item = await inbox.get()
                if isinstance(item, TokenEvent):
                    # One chunk per generated token, as OpenAI streams, even when its text is held
                    # back (half a character, a possible stop string): clients see the progress.
                    text, entries = job.choice.feed(item)
                    if item.token is not None or text or entries:
                        yield _sse(shape.chunk([shape.delta(job.choice, text, entries)]))
                elif isinstance(item, Completion):
                    done.append((job.choice, item))
                    entries = job.choice.final(item)
                    yield _sse(shape.chunk([shape.delta(job.choice, "", entries, FINISH[item.finish_reason])]))
                else:
                    error = _failure(item)
                    log.warning("a streamed generation failed: %s", item)
                    yield _sse(error.body())
                    return
            if shape.include_usage:
                yield _sse(shape.usage_chunk(sorted(done, key=lambda d: d[0].index)))
            yield b"data: [DONE]\n\n"
        finally:  # the client left, or the stream ended: no generation outlives it
            for task in tasks:
                task.cancel()


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def _failure(exc: BaseException) -> ApiError:
    if isinstance(exc, EngineClosedError):
        return ApiError(503, "The server is shutting down.", type="server_error", code="unavailable")
    return ApiError(500, f"The generation failed: {exc}", type="server_error", code="generation_failed")


async def _all(coroutines: Any) -> list[Any]:
    """Run them together; the first failure cancels the rest (asyncio.gather would leave them running)."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        for task in asyncio.as_completed(tasks):
            await task
        return [task.result() for task in tasks]
    finally:
        for task in tasks:
            task.cancel()


async def _until_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """`work`'s result, or None if the client disconnects first (then `work` is cancelled)."""
    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        return None
    finally:
        watcher.cancel()
        task.cancel()


def create_app(model: Model, settings: ServeSettings | None = None) -> Starlette:
    """The ASGI application. Its engine starts and stops with the app's lifespan."""
    settings = settings or ServeSettings()
    service = Service(model, settings)
    limits = settings.limits

    async def completions(request: Request) -> Response:
        service.authorize(request)
        body = await service.read_json(request)
        req: CompletionRequest = parse_completion(body, limits, max_tokens_limit=service.max_tokens)
        prompts = await asyncio.to_thread(service.encode, req.prompts)
        shape = TextShape(service.name, service.fingerprint, service.pieces, logprobs=req.logprobs is not None,
                          include_usage=req.sampling.include_usage)
        texts = [model.decode(ids) if not isinstance(p, str) else p for p, ids in zip(req.prompts, prompts)] \
            if req.echo else None
        jobs = service.submit(prompts, req.sampling,
                              lambda i, p: Choice(i, p, prefix=texts[p] if texts else ""),
                              logprobs=req.logprobs is not None, top_logprobs=req.logprobs or 0,
                              stop=req.sampling.stop)
        return await service.respond(request, jobs, shape, req.sampling.stream)

    async def chat_completions(request: Request) -> Response:
        service.authorize(request)
        body = await service.read_json(request)
        req: ChatRequest = parse_chat(body, limits, max_tokens_limit=service.max_tokens)
        chat_format = settings.chat_format
        transcript = chat_format.render(req.messages)
        prompts = await asyncio.to_thread(service.encode, (transcript,), "messages")
        shape = ChatShape(service.name, service.fingerprint, service.pieces, logprobs=req.logprobs,
                          include_usage=req.sampling.include_usage)
        jobs = service.submit(prompts, req.sampling, lambda i, p: Choice(i, p, strip_leading=True),
                              logprobs=req.logprobs, top_logprobs=req.top_logprobs,
                              stop=chat_format.stop + req.sampling.stop)
        return await service.respond(request, jobs, shape, req.sampling.stream)

    def model_card() -> dict[str, Any]:
        return {"id": service.name, "object": "model", "created": service.created, "owned_by": "neoedge"}

    async def models(request: Request) -> Response:
        service.authorize(request)
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def one_model(request: Request) -> Response:
        service.authorize(request)
        if request.path_params["model"] != service.name:
            raise ApiError(404, f"The model '{request.path_params['model']}' does not exist (this server has "
                                f"'{service.name}').", param="model", code="model_not_found")
        return JSONResponse(model_card())

    async def health(request: Request) -> Response:
        engine = service.engine
        if engine is None:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return JSONResponse({"status": "ok", "model": service.name, "engine": asdict(engine.stats()),
                             "max_batch": settings.engine.max_batch, "max_queue": settings.engine.max_queue})

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            error = ApiError(404, f"Unknown request URL: {request.method} {request.url.path}.", code="unknown_url")
        elif exc.status_code == 405:
            error = ApiError(405, f"{request.method} is not allowed on {request.url.path}.", code="method_not_allowed")
        else:
            error = ApiError(exc.status_code, str(exc.detail))
        return JSONResponse(error.body(), status_code=error.status, headers=dict(exc.headers or {}))

    async def server_error(request: Request, exc: Exception) -> Response:
        log.error("request failed: %s %s", request.method, request.url.path, exc_info=exc)
        error = ApiError(500, f"The server failed: {type(exc).__name__}: {exc}", type="server_error")
        return JSONResponse(error.body(), status_code=500)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            await asyncio.to_thread(service.close)

    app = Starlette(
        routes=[Route("/v1/completions", completions, methods=["POST"]),
                Route("/v1/chat/completions", chat_completions, methods=["POST"]),
                Route("/v1/models", models, methods=["GET"]),
                Route("/v1/models/{model:path}", one_model, methods=["GET"]),
                Route("/health", health, methods=["GET"])],
        exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: server_error},
        lifespan=lifespan)
    app.state.service = service
    return app

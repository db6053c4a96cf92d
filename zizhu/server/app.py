"""The FastAPI app: OpenAI-compatible routes around one AsyncLLMEngine.

    POST /v1/chat/completions   POST /v1/completions   GET /v1/models
    GET /health                 GET /metrics           GET /docs (OpenAPI)

Every error is answered as OpenAI's {"error": {"message", "type", "param", "code"}} body.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from zizhu.errors import InvalidRequestError, PromptTooLongError, QueueFullError
from zizhu.server.metrics import ServerMetrics
from zizhu.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    now,
)
from zizhu.server.serving import APIError, ServingConfig, ServingContext, sse
from zizhu.server.serving_chat import ChatHandler
from zizhu.server.serving_completion import CompletionHandler

logger = logging.getLogger(__name__)

ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (400, 401, 404, 503)}


def error_response(status: int, message: str, type: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


class APIKeyMiddleware:
    """Require `Authorization: Bearer <key>` on /v1/*; health, metrics and docs stay open.

    A plain ASGI middleware, so it answers before the body is parsed and never wraps the stream.
    """

    def __init__(self, app, api_key: str, on_reject=None):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.on_reject = on_reject

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            headers = dict(scope["headers"])
            given = headers.get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                message = "Missing API key." if not given else "Incorrect API key provided."
                if self.on_reject is not None:
                    self.on_reject()
                response = error_response(401, message, "invalid_request_error", code="invalid_api_key")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _until_disconnect(raw_request: Request, work) -> object | None:
    """Run `work` but cancel it if the client goes away first (which aborts its engine request)."""

    async def disconnected() -> None:
        while (await raw_request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return None
    return task.result()


def build_app(async_engine, config: ServingConfig, api_key: str | None = None) -> FastAPI:
    """`async_engine` follows zizhu.engine.async_engine.AsyncLLMEngine: generate(), abort(), .engine."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        await async_engine.shutdown()

    app = FastAPI(title="zizhu", description="OpenAI-compatible API for DeepSeek models", version="0.1.0", lifespan=lifespan)
    metrics = ServerMetrics(async_engine.engine.stats)
    ctx = ServingContext(async_engine, config, metrics)
    chat, completions = ChatHandler(ctx), CompletionHandler(ctx)
    app.state.serving = ctx
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key, on_reject=metrics.errors.labels("401").inc)

    def failed(status: int, message: str, type: str, param: str | None = None, code: str | None = None) -> JSONResponse:
        metrics.errors.labels(str(status)).inc()
        return error_response(status, message, type, param, code)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return failed(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(InvalidRequestError)
    async def _invalid(raw_request: Request, exc: InvalidRequestError):
        param, code = exc.param, None
        if isinstance(exc, PromptTooLongError):
            code = "context_length_exceeded"
            param = "prompt" if raw_request.url.path == "/v1/completions" else "messages"
        return failed(400, str(exc), "invalid_request_error", param, code)

    @app.exception_handler(QueueFullError)
    async def _queue_full(_: Request, exc: QueueFullError):
        return failed(503, str(exc) or "The server is overloaded; retry later.", "server_error", code="queue_full")

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        problems, param = [], None
        for error in exc.errors():
            location = [str(part) for part in error.get("loc", ()) if part != "body"]
            param = param or (location[0] if location else None)
            problems.append(f"{'.'.join(location) or 'body'}: {error.get('msg')}")
        return failed(400, "Invalid request: " + "; ".join(problems), "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        return failed(exc.status_code, str(exc.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        logger.exception("request failed")
        return failed(500, f"Internal error: {type(exc).__name__}: {exc}", "server_error")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> ModelList:
        created = now()
        return ModelList(data=[ModelCard(id=name, created=created, max_model_len=ctx.max_model_len) for name in config.model_names])

    async def answer(raw_request: Request, work):
        result = await _until_disconnect(raw_request, work)
        if result is None:  # the client left; nobody reads this
            return Response(status_code=499)
        if isinstance(result, (ChatCompletionResponse, CompletionResponse)):
            return JSONResponse(result.model_dump(mode="json"))
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(sse(result), media_type="text/event-stream", headers=headers)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERROR_RESPONSES)
    async def chat_completions(request: ChatCompletionRequest, raw_request: Request):
        return await answer(raw_request, chat.create(request))

    @app.post("/v1/completions", response_model=CompletionResponse, responses=ERROR_RESPONSES)
    async def text_completions(request: CompletionRequest, raw_request: Request):
        return await answer(raw_request, completions.create(request))

    return app

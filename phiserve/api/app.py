"""The FastAPI application: routes, auth, health, metrics. The model loads in the background so
/health can answer 503 while loading."""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import signal
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

from phiserve.api.chat import create_chat_completion
from phiserve.api.completions import create_completion
from phiserve.api.errors import OpenAIError, install_error_handlers
from phiserve.api.protocol import ChatCompletionRequest, CompletionRequest
from phiserve.api.usage import usage_dict
from phiserve.host import ModelHost, ServeOptions

log = logging.getLogger(__name__)


class AppState:
    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.host: ModelHost | None = None
        self.load_error: str | None = None
        self.registry = CollectorRegistry()


def create_app(options: ServeOptions, host: ModelHost | None = None) -> FastAPI:
    state = AppState(options)

    async def load() -> None:
        try:
            state.host = await asyncio.to_thread(ModelHost, options, state.registry)
        except Exception as exc:  # reported by /health; the process keeps answering
            # A server that cannot serve its one model should not linger: say why in one line and exit.
            state.load_error = str(exc)
            log.error("model failed to load: %s", exc)
            log.debug("load failure", exc_info=True)
            os.kill(os.getpid(), signal.SIGTERM)

    @asynccontextmanager
    async def lifespan(_: FastAPI):  # noqa: ANN202
        task = None
        if host is not None:
            state.host = host
        else:
            task = asyncio.create_task(load())
        yield
        if task is not None:
            task.cancel()
        if state.host is not None:
            state.host.shutdown()

    app = FastAPI(title="phiserve", lifespan=lifespan)
    app.state.phiserve = state  # the CLI waits on it to drive the engine from the main thread
    install_error_handlers(app)
    engine_gauges = Gauge("phiserve_engine", "Engine state", ["stat"], registry=state.registry)

    def ready_host(request: Request) -> ModelHost:
        if options.api_key is not None:
            header = request.headers.get("authorization", "")
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not given:
                raise OpenAIError(401, "You didn't provide an API key. Provide it in an Authorization header (Bearer auth).", code="invalid_api_key")
            if not hmac.compare_digest(given, options.api_key):
                raise OpenAIError(401, "Incorrect API key provided.", code="invalid_api_key")
        if state.host is None:
            raise OpenAIError(503, "The model is still loading." if state.load_error is None else f"The model failed to load: {state.load_error}", type="server_error", code="model_not_ready")
        return state.host

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.host is None:
            status = "loading" if state.load_error is None else "failed"
            return JSONResponse({"status": status, "error": state.load_error}, status_code=503)
        if state.host.engine.error is not None:
            return JSONResponse({"status": "engine_dead", "error": str(state.host.engine.error)}, status_code=503)
        return JSONResponse({"status": "ok", "model": state.host.name})

    @app.get("/v1/models")
    @app.get("/v1/openai/models")
    async def models(host: ModelHost = Depends(ready_host)) -> JSONResponse:
        card = {"id": host.name, "object": "model", "created": 0, "owned_by": "phiserve", "max_model_len": host.max_model_len}
        return JSONResponse({"object": "list", "data": [card]})

    @app.post("/v1/chat/completions")
    @app.post("/v1/openai/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request, host: ModelHost = Depends(ready_host)) -> Response:
        return await create_chat_completion(req, request, host)

    @app.post("/v1/completions")
    @app.post("/v1/openai/completions")
    async def completions(req: CompletionRequest, request: Request, host: ModelHost = Depends(ready_host)) -> Response:
        return await create_completion(req, request, host)

    @app.get("/stats")
    async def stats(host: ModelHost = Depends(ready_host)) -> JSONResponse:
        usage = host.ledger.snapshot()
        cost = usage_dict(usage["prompt_tokens"], usage["completion_tokens"], host.prices)["estimated_cost"]
        return JSONResponse({"engine": host.engine.stats(), "usage": {**usage, "estimated_cost": cost}})

    @app.get("/metrics")
    async def metrics() -> Response:
        if state.host is not None:
            for key, value in state.host.engine.stats().items():
                engine_gauges.labels(key).set(value)
        return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)

    return app

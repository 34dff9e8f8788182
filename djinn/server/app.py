"""The FastAPI app: REST control routes, the WebSocket stream, /healthz, /metrics, and the OpenAI routes.

REST (bodies JSON or msgpack; replies msgpack when the request accepts `application/msgpack`, else JSON;
every error is `{"error": {"code", "message", ...}}` with the error's HTTP status):

    GET    /healthz                              {"status": "ok", "protocol": N, "version": ...}
    GET    /metrics                              Prometheus text
    GET    /api/models                           [ModelInfo]
    POST   /api/sessions            {model?}     {"id"}
    GET    /api/sessions                         [SessionInfo]   (the caller's own sessions only)
    GET    /api/sessions/{sid}                   SessionInfo
    DELETE /api/sessions/{sid}
    POST   /api/sessions/{sid}/generate  {prompt, max_new_tokens, ...}   GenerateResult (no breakpoints)
    PUT    /api/sessions/{sid}/interventions  {interventions: [...]}
    POST   /api/sessions/{sid}/resume   {activation?}     (a paused stream, e.g. after a reconnect)
    POST   /api/sessions/{sid}/cancel
    POST   /api/sessions/{sid}/checkpoint         {"id"}
    POST   /api/sessions/{sid}/fork               {"id"}
    GET    /api/checkpoints/{cid}                 status
    POST   /api/checkpoints/{cid}/restore         {"id"}
    DELETE /api/checkpoints/{cid}
    POST   /api/tokenize     {text, model?}       {"ids"}
    POST   /api/detokenize   {ids, model?}        {"text"}
    WS     /api/sessions/{sid}/stream             see stream.py
    WS     /api/control                           the same control calls over one socket: see control.py
    POST   /v1/completions, GET /v1/models        see openai.py
"""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import Iterable, Optional, Union

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..engine.engine import Engine
from ..engine.service import EngineService
from ..errors import InvalidRequest
from ..events import Done, Error, Paused
from . import openai as openai_routes
from .auth import Auth, load_api_keys
from .limits import Limits
from .metrics import CONTENT_TYPE
from . import calls
from .control import control_endpoint
from .protocol import PROTOCOL_VERSION, decode_params, decode_prompt, encode_result
from .state import ServerState, error_body, fields, guarded
from .stream import stream_endpoint

log = logging.getLogger("djinn.server")


def create_app(engine_or_service: Union[Engine, EngineService], api_keys: Optional[Iterable[str]] = None,
               limits: Optional[Limits] = None) -> FastAPI:
    """The Djinn server app over an engine (its thread is started here and stopped with the app) or an
    already running EngineService (left running). `api_keys`: None reads DJINN_API_KEYS; [] means no auth
    (loopback use only)."""
    if isinstance(engine_or_service, EngineService):
        service, owns = engine_or_service, False
    else:
        service, owns = EngineService(engine_or_service), True
    keys = load_api_keys() if api_keys is None else list(api_keys)
    state = ServerState(service, Auth(keys), limits or Limits(), owns)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if state.owns_service:
            await asyncio.get_running_loop().run_in_executor(None, service.shutdown)

    app = FastAPI(title="Djinn", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.djinn = state
    guard = guarded(state)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        msg = {404: f"no route {request.method} {request.url.path}",
               405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code,
                                                                                          str(exc.detail))
        e = InvalidRequest(msg)
        state.metrics.error(e.code)
        return JSONResponse(error_body(e), status_code=exc.status_code)

    # ------------------------------------------------------------------ health, metrics, models

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "protocol": PROTOCOL_VERSION, "version": __version__,
                "auth": state.auth.enabled}

    @app.get("/metrics")
    @guard
    async def metrics():
        return Response(await state.metrics.render(state.call), media_type=CONTENT_TYPE)

    @app.get("/api/models")
    @guard
    async def models(request: Request):
        return state.reply(request, await calls.models(state, state.identify(request)))

    # ------------------------------------------------------------------ sessions

    @app.post("/api/sessions")
    @guard
    async def create_session(request: Request):
        owner = state.identify(request)
        body = await state.body(request)
        fields(body, ("model",), "create session")
        return state.reply(request, await calls.create_session(state, owner, body.get("model")))

    @app.get("/api/sessions")
    @guard
    async def list_sessions(request: Request):
        return state.reply(request, await calls.list_sessions(state, state.identify(request)))

    @app.get("/api/sessions/{sid}")
    @guard
    async def session_info(request: Request, sid: str):
        return state.reply(request, await calls.session_info(state, state.identify(request), sid))

    @app.delete("/api/sessions/{sid}")
    @guard
    async def close_session(request: Request, sid: str):
        return state.reply(request, await calls.close_session(state, state.identify(request), sid))

    @app.post("/api/sessions/{sid}/generate")
    @guard
    async def generate(request: Request, sid: str):
        """Non-streaming generate: the whole result at once. Breakpoints need the WebSocket stream."""
        owner = state.identify(request)
        body = await state.body(request)
        lim = state.limits
        prompt = decode_prompt(body.pop("prompt", []), lim.max_prompt_tokens, lim.max_prompt_chars)
        params = decode_params(body, lim.max_list_items)
        if params.get("breakpoints"):
            raise InvalidRequest("breakpoints need a stream: open the WebSocket /api/sessions/{sid}/stream")
        lim.check_max_new_tokens(params.get("max_new_tokens"))
        loop = asyncio.get_running_loop()
        result: asyncio.Future = loop.create_future()

        def on_event(ev: object) -> None:
            if result.done():
                return
            if isinstance(ev, Done):
                result.set_result(ev.result)
            elif isinstance(ev, Error):
                result.set_exception(ev.error)
            elif isinstance(ev, Paused):  # cannot happen without breakpoints; never leave a session stuck
                state.post_nowait("resume", sid, owner, None)

        await state.generate(sid, owner, prompt, state.sink(on_event), **params)
        return state.reply(request, encode_result(await result))

    @app.put("/api/sessions/{sid}/interventions")
    @guard
    async def set_interventions(request: Request, sid: str):
        owner = state.identify(request)
        body = await state.body(request)
        fields(body, ("interventions",), "set interventions")
        return state.reply(request, await calls.set_interventions(state, owner, sid, body.get("interventions", [])))

    @app.post("/api/sessions/{sid}/resume")
    @guard
    async def resume(request: Request, sid: str):
        owner = state.identify(request)
        body = await state.body(request)
        fields(body, ("activation", "pause"), "resume")
        return state.reply(request, await calls.resume(state, owner, sid, body.get("activation"), body.get("pause")))

    @app.post("/api/sessions/{sid}/cancel")
    @guard
    async def cancel(request: Request, sid: str):
        return state.reply(request, await calls.cancel(state, state.identify(request), sid))

    @app.post("/api/sessions/{sid}/checkpoint")
    @guard
    async def checkpoint(request: Request, sid: str):
        owner = state.identify(request)
        fields(await state.body(request), (), "checkpoint")
        return state.reply(request, await calls.checkpoint(state, owner, sid))

    @app.post("/api/sessions/{sid}/fork")
    @guard
    async def fork(request: Request, sid: str):
        return state.reply(request, await calls.fork(state, state.identify(request), sid))

    # ------------------------------------------------------------------ checkpoints

    @app.get("/api/checkpoints/{cid}")
    @guard
    async def checkpoint_status(request: Request, cid: str):
        return state.reply(request, await calls.checkpoint_status(state, state.identify(request), cid))

    @app.post("/api/checkpoints/{cid}/restore")
    @guard
    async def restore(request: Request, cid: str):
        return state.reply(request, await calls.restore(state, state.identify(request), cid))

    @app.delete("/api/checkpoints/{cid}")
    @guard
    async def delete_checkpoint(request: Request, cid: str):
        return state.reply(request, await calls.delete_checkpoint(state, state.identify(request), cid))

    # ------------------------------------------------------------------ tokenizer

    @app.post("/api/tokenize")
    @guard
    async def tokenize(request: Request):
        owner = state.identify(request)
        body = await state.body(request)
        fields(body, ("text", "model"), "tokenize")
        return state.reply(request, await calls.tokenize(state, owner, body.get("text"), body.get("model")))

    @app.post("/api/detokenize")
    @guard
    async def detokenize(request: Request):
        owner = state.identify(request)
        body = await state.body(request)
        fields(body, ("ids", "model"), "detokenize")
        return state.reply(request, await calls.detokenize(state, owner, body.get("ids"), body.get("model")))

    # ------------------------------------------------------------------ the interactive stream

    @app.websocket("/api/sessions/{sid}/stream")
    async def stream(ws: WebSocket, sid: str):
        await stream_endpoint(ws, sid, state)

    @app.websocket("/api/control")
    async def control(ws: WebSocket):
        await control_endpoint(ws, state)

    openai_routes.register(app, state, guard)
    return app


__all__ = ["create_app"]

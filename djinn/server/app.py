"""The FastAPI app: REST control routes, the WebSocket stream, /healthz, /metrics, and the OpenAI routes.

REST (bodies JSON or msgpack; replies msgpack when the request accepts `application/msgpack`, else JSON;
every error is `{"error": {"code", "message", ...}}` with the error's HTTP status):

    GET    /healthz                              {"status": "ok", "protocol": N, "version": ..., "replica": ...}
    GET    /metrics                              Prometheus text
    *      /api/...                              the control calls: each call's verb and path as declared in
                                                 djinn/calls.py, its first argument in the path, the others as
                                                 body fields of their names; replies as declared there
    POST   /api/sessions/{sid}/generate  {prompt, max_new_tokens, ...}   GenerateResult (no breakpoints)
    WS     /api/sessions/{sid}/stream             see stream.py
    WS     /api/control                           the same control calls over one socket: see control.py
    POST   /v1/completions, /v1/chat/completions, GET /v1/models    see openai.py, openai_chat.py
"""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import Awaitable, Callable, Iterable, Optional, Union

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__, validation
from ..calls import CALLS, Call
from ..engine.engine import Engine
from ..engine.service import EngineService
from ..errors import DjinnError, InvalidRequest
from ..events import Done, Error, Paused
from ..wire import PROTOCOL_VERSION, decode_json, decode_params, decode_prompt, encode_result
from . import openai as openai_routes
from .auth import Auth, load_api_keys
from .limits import Limits
from .control import control_endpoint
from .metrics import CONTENT_TYPE
from .state import ServerState, error_body, fields, guarded
from .runs import run_endpoint
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

    # ------------------------------------------------------------------ health, metrics

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "protocol": PROTOCOL_VERSION, "version": __version__,
                "auth": state.auth.enabled, "replica": state.service.engine.replica}

    @app.get("/metrics")
    @guard
    async def metrics():
        return Response(await state.metrics.render(state.call), media_type=CONTENT_TYPE)

    # ------------------------------------------------------------------ the control calls

    for call in CALLS.values():
        app.add_api_route(call.path, guard(control_route(state, call)), methods=[call.verb], name=call.name)

    # ------------------------------------------------------------------ generation

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

    # ------------------------------------------------------------------ the interactive stream

    @app.websocket("/api/sessions/{sid}/stream")
    async def stream(ws: WebSocket, sid: str):
        await stream_endpoint(ws, sid, state)

    @app.websocket("/api/runs")
    async def runs(ws: WebSocket):
        await run_endpoint(ws, state)

    @app.websocket("/api/control")
    async def control(ws: WebSocket):
        await control_endpoint(ws, state)

    openai_routes.register(app, state, guard)
    return app


def control_route(state: ServerState, call: Call) -> Callable[[Request], Awaitable[Response]]:
    """The REST route of a declared call: its first argument from the path, where the path names it; the
    others from the body's fields of their names."""
    reads_body = call.verb in ("POST", "PUT")
    names = tuple(a.name for a in call.in_body)

    async def route(request: Request) -> Response:
        owner = state.identify(request)
        args = [request.path_params[a.name] for a in call.in_path]
        if reads_body:
            body = await state.body(request)
        else:  # a GET's other arguments are query parameters, each a JSON value
            body = {k: query_value(k, v) for k, v in request.query_params.items()}
        fields(body, names, call.name.replace("_", " "))
        args += [body.get(a.name, a.default) for a in call.in_body]
        return state.reply(request, await state.run_call(owner, call, args))

    route.__name__ = call.name
    return route


def query_value(name: str, text: str) -> object:
    try:
        return decode_json(text.encode())
    except DjinnError:
        raise InvalidRequest(f"query parameter {name} must be a JSON value (a number, true, null, a quoted "
                             f"string), got {validation.shown(text)}") from None


__all__ = ["create_app"]

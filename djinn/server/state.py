"""What every route shares: the engine service, auth, limits, metrics; reading bodies, writing replies and
typed errors; handing engine events (produced on the engine thread) to the event loop."""
from __future__ import annotations

import asyncio
import functools
import logging
from collections import defaultdict
from typing import Any, Callable, Optional, Sequence

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from ..calls import CALLS, Call
from ..engine.service import EngineService
from ..errors import (DjinnError, FrameTooLarge, InternalError, InvalidRequest, MalformedFrame,
                      ProtocolMismatch, UnknownModel)
from ..validation import shown
from .auth import Auth
from .inbox import LoopInbox
from .limits import Limits
from .metrics import Metrics
from ..wire import (MSGPACK, PROTOCOL_HEADER, PROTOCOL_VERSION, decode_json, encode_error, jsonable,
                       mismatch_message, pack, unpack_map)

log = logging.getLogger("djinn.server")


class ServerState:
    def __init__(self, service: EngineService, auth: Auth, limits: Limits, owns_service: bool):
        self.service, self.auth, self.limits, self.owns_service = service, auth, limits, owns_service
        self.metrics = Metrics(service.engine.stats)
        self.breakpoint_streams: dict[str, int] = defaultdict(int)  # owner -> streams that may pause
        self.runs_per_key: dict[str, int] = defaultdict(int)  # owner -> runs going (server/runs.py)
        self._owner_locks: dict[str, asyncio.Lock] = {}
        self._inbox: Optional[LoopInbox] = None

    # -------------------------------------------------------------- the engine thread

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run `engine.<method>` on the engine thread; never touches the engine from the event loop."""
        try:
            fut = self.service.post(method, *args, **kwargs)
        except RuntimeError:
            raise InternalError("the engine is shut down") from None
        return await asyncio.wrap_future(fut)

    async def generate(self, sid: str, owner: str, prompt: Any, sink: Callable[[object], None], **params: Any) -> None:
        """Start a generate call. A text prompt is tokenized in a worker thread first (its length was checked
        when it was decoded): neither the event loop nor the engine thread spends time on it."""
        if isinstance(prompt, str):
            prompt = await asyncio.get_running_loop().run_in_executor(
                None, self.service.engine.encode_prompt, sid, prompt)
        await self.call("generate", sid, owner, prompt, sink, **params)

    def sink(self, on_event: Callable[[object], None]) -> Callable[[object], None]:
        """A sink the engine thread can call: hands each event to `on_event` on this server's event loop (call
        it from the loop), in order, and never raises into the engine."""
        loop = asyncio.get_running_loop()
        if self._inbox is None or self._inbox.loop is not loop:
            self._inbox = LoopInbox(loop)
        return functools.partial(self._inbox.put, on_event)

    def post_nowait(self, method: str, *args: Any) -> None:
        """Fire and forget (cleanup paths that must not wait, e.g. after a client went away)."""
        try:
            self.service.post(method, *args)
        except RuntimeError:
            pass

    def owner_lock(self, owner: str) -> asyncio.Lock:
        return self._owner_locks.setdefault(owner, asyncio.Lock())

    async def run_call(self, owner: str, call: Call, args: Sequence[Any]) -> Any:
        """A declared control call for `owner`, its arguments as they came off the wire: its reply body."""
        values = call.decode(args, self.limits)
        if call.creates == "session":
            result = await self.new_session(owner, call.name, *values)
        elif call.creates == "checkpoint":  # the per-key limit is checked by the engine thread: one round trip
            result = await self.call(call.name, *call.engine_args(owner, values), self.limits.check_checkpoints)
        elif call.on_engine_thread:
            result = await self.call(call.name, *call.engine_args(owner, values))
        else:
            method = getattr(self.service.engine, call.name)
            result = await asyncio.get_running_loop().run_in_executor(
                None, functools.partial(method, *call.engine_args(owner, values)))
        return call.reply.wire(result)

    async def new_session(self, owner: str, name: str, *args: Any) -> str:
        """create_session / fork / restore under the per-key session limit."""
        async with self.owner_lock(owner):
            held = await self.call("list_sessions", owner)
            self.limits.check_sessions(len(held))
            if name == "fork" and any(h.id == args[0] and h.state == "paused" for h in held):
                # a fork made at a pause is one more paused session of this key
                self.limits.check_paused(sum(h.state == "paused" for h in held))
            return await self.call(name, *CALLS[name].engine_args(owner, args))

    async def model_info(self, model: Optional[str]) -> Any:
        """The ModelInfo of `model` (None: the default model), or UnknownModel."""
        infos = await self.call("models")
        if model is None:
            return infos[0]
        for m in infos:
            if m.name == model:
                return m
        raise UnknownModel(f"unknown model {shown(model)}; this server has {sorted(m.name for m in infos)}")

    # -------------------------------------------------------------- requests

    def identify(self, request: Request) -> str:
        version = request.headers.get(PROTOCOL_HEADER)
        if version is not None and version != str(PROTOCOL_VERSION):
            raise ProtocolMismatch(mismatch_message(version))
        return self.auth.identify(request.headers)

    async def body(self, request: Request) -> dict:
        """The request body as a map: msgpack (Content-Type application/msgpack) or JSON; {} when empty."""
        limit = self.limits.max_frame_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise FrameTooLarge(f"request body of {declared} bytes exceeds the limit of {limit} bytes")
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise FrameTooLarge(f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        raw = b"".join(chunks)
        if not raw.strip():
            return {}
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == MSGPACK:
            return unpack_map(raw)
        obj = decode_json(raw)
        if not isinstance(obj, dict):
            raise MalformedFrame(f"request body must be a JSON object, got {type(obj).__name__}")
        return obj

    def reply(self, request: Request, obj: Any, status: int = 200) -> Response:
        if MSGPACK in request.headers.get("accept", ""):
            return Response(pack(obj), status_code=status, media_type=MSGPACK)
        return JSONResponse(jsonable(obj), status_code=status)

    def error_response(self, e: DjinnError) -> JSONResponse:
        self.metrics.error(e.code)
        return JSONResponse(error_body(e), status_code=e.http_status)


def error_body(e: DjinnError) -> dict:
    """The one error shape of every route (OpenAI's {"error": {"message", "type", "param", "code"}}); `param`
    names the request field at fault where the error knows it."""
    return {"error": {**encode_error(e), "type": e.code, "param": getattr(e, "param", None)}}


def fields(body: dict, allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise InvalidRequest(f"{where}: unknown field(s) {unknown}; fields are {list(allowed)}")


def guarded(state: ServerState) -> Callable:
    """Route decorator: every failure becomes a typed error body; an unexpected one is logged here and
    reported as `internal` without a traceback."""

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        async def wrapper(*args, **kwargs):
            try:
                return await fn(*args, **kwargs)
            except DjinnError as e:
                return state.error_response(e)
            except Exception as e:
                log.exception("unexpected error in %s", fn.__name__)
                return state.error_response(InternalError(f"unexpected server error ({type(e).__name__})"))

        return wrapper

    return deco

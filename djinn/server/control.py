"""The control WebSocket: `/api/control`, the REST control calls over one long-lived socket, so that a call
costs a frame each way instead of an HTTP request (what `checkpoint()` returning at once needs).

    client -> {"type": "hello", "protocol": 1}
    server -> {"type": "hello", "protocol": 1, "server": "djinn/...", "max_frame_bytes": N}
    client -> {"type": "call", "id": k, "method": "checkpoint", "args": [sid]}
    server -> {"type": "reply", "id": k, "ok": true, "result": {"id": ...}}
              or {"type": "reply", "id": k, "ok": false, "code": ..., "message": ...}

Methods and arguments are the calls declared in `djinn/calls.py`; results are the REST routes' bodies.
Calls on one socket are answered one at a time, in order. A bad frame or call gets an `ok: false` reply with
its typed error; the socket and every session carry on.
"""
from __future__ import annotations

import logging
from typing import Any

from fastapi import WebSocket

from ..calls import control_call
from ..errors import DjinnError, InternalError, InvalidRequest, MalformedFrame
from ..validation import shown
from ..wire import encode_error
from .sockets import Conn, Gone, greet, serve_socket
from .state import ServerState

log = logging.getLogger("djinn.server")


async def control_endpoint(ws: WebSocket, state: ServerState) -> None:
    async def serve(conn: Conn) -> None:
        owner = await greet(conn, state)
        while owner is not None:
            await conn.send(await _answer(state, owner, conn))
    await serve_socket(ws, state, serve, "control socket")


async def _answer(state: ServerState, owner: str, conn: Conn) -> dict:
    """Read one call frame and run it: its reply frame, typed error included."""
    call_id: Any = None
    try:
        frame = await conn.recv()
        call_id = frame.get("id")
        if frame.get("type") != "call":
            raise MalformedFrame(f"unknown frame type {shown(frame.get('type'))}; the control socket takes "
                                 f"'call' frames")
        unknown = sorted(set(frame) - {"type", "id", "method", "args"})
        if unknown:
            raise InvalidRequest(f"call frame: unknown field(s) {unknown}; fields are ['id', 'method', 'args']")
        call, args = control_call(frame.get("method")), frame.get("args", [])
        if not isinstance(args, list):
            raise MalformedFrame(f"the arguments of {call.name} must be a list")
        return {"type": "reply", "id": call_id, "ok": True, "result": await state.run_call(owner, call, args)}
    except Gone:
        raise
    except Exception as e:
        if not isinstance(e, DjinnError):  # a bug: this call fails, the socket goes on
            log.exception("control call failed")
            e = InternalError(f"unexpected server error ({type(e).__name__})")
        state.metrics.error(e.code)
        return {"type": "reply", "id": call_id, "ok": False, **encode_error(e)}

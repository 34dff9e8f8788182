"""One WebSocket per interactive stream: `/api/sessions/{sid}/stream`.

Frames are binary msgpack maps (see protocol.py). The conversation:

    client -> {"type": "hello", "protocol": 1}
    server -> {"type": "hello", "protocol": 1, "server": "djinn/...", "max_frame_bytes": N}
              (or {"type": "error", code: "protocol_mismatch", message naming both versions}, then close)
    client -> {"type": "generate", "prompt": text | [ids], "params": {max_new_tokens, ..., interventions,
               breakpoints}}
              or {"type": "attach"}: take over the events of the call in progress (a reconnect, or a fork
              made at a pause); a paused session repeats its Paused event
    server -> {"type": "token", ...} | {"type": "paused", site, step, positions, activation} | ...
              until {"type": "done", "result": ...} or {"type": "error", code, message}; then close (1000)
    client -> {"type": "resume", "activation": tensor | null, "pause": id}   (while paused; the id from
              the paused event, so that a late resume never continues a later pause)
    server -> {"type": "reply", "to": "resume", "ok": true}  or  ok: false with code and message
    client -> {"type": "cancel"}  ->  {"type": "reply", "to": "cancel", "ok": true}, then the stream's error

The client may send hello and generate back to back (no round trip). Any bad frame during the stream gets
a `reply` with ok false and a typed error; the stream and the session carry on. A client that disconnects
cancels nothing: a paused session stays paused until it is resumed over REST or its time-to-live frees it.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import WebSocket

from ..errors import DjinnError, InternalError, InvalidRequest, MalformedFrame
from ..events import Done, Error
from ..validation import shown
from ..wire import decode_params, decode_prompt, decode_tensor, encode_error, encode_event, pause_id
from .sockets import Conn, Gone, greet, serve_socket
from .state import ServerState

log = logging.getLogger("djinn.server")

async def stream_endpoint(ws: WebSocket, sid: str, state: ServerState) -> None:
    state.metrics.active_streams.inc()
    try:
        await serve_socket(ws, state, lambda conn: _serve(conn, sid, state), "stream")
    finally:
        state.metrics.active_streams.dec()


async def _serve(conn: Conn, sid: str, state: ServerState) -> None:
    owner = await greet(conn, state)
    if owner is None:
        return

    req = await conn.recv()
    kind = req.get("type")
    if kind not in ("generate", "attach"):
        raise MalformedFrame(f"expected a 'generate' or 'attach' frame after hello, got type {shown(kind)}")
    fields = ("prompt", "params") if kind == "generate" else ()
    unknown = sorted(set(req) - {"type", *fields})
    if unknown:
        raise InvalidRequest(f"{kind} frame: unknown field(s) {unknown}; fields are {list(fields)}")
    lim = state.limits
    if kind == "generate":
        prompt = decode_prompt(req.get("prompt", []), lim.max_prompt_tokens, lim.max_prompt_chars)
        params = decode_params(req.get("params"), lim.max_list_items)
        lim.check_max_new_tokens(params.get("max_new_tokens"))

    events: asyncio.Queue = asyncio.Queue()  # engine events and replies to client frames, in order
    # streams that can pause count against the per-key limit (an attached stream may be paused already)
    counted = kind == "attach" or bool(params.get("breakpoints"))
    released = False

    def release() -> None:
        nonlocal released
        if counted and not released:
            released = True
            state.breakpoint_streams[owner] -= 1

    def on_event(ev: object) -> None:  # on the loop, for every engine event, connected or not
        if isinstance(ev, (Done, Error)):
            release()
        if conn.open:
            events.put_nowait(ev)

    if counted:
        lim.check_paused(state.breakpoint_streams[owner])
        state.breakpoint_streams[owner] += 1
    try:
        sink = state.sink(on_event)
        if kind == "generate":
            await state.generate(sid, owner, prompt, sink, **params)
        else:
            await state.call("attach", sid, owner, sink)
    except BaseException:
        release()
        raise

    reader_idle = asyncio.Event()  # set while the reader is not in the middle of handling a frame
    reader_idle.set()

    async def writer() -> str:
        while True:
            item = await events.get()
            if isinstance(item, dict):  # a reply to a client frame
                await conn.send(item)
                continue
            await conn.send(encode_event(item))
            if isinstance(item, (Done, Error)):
                # a frame being handled right now (say a resume racing the pause TTL) still gets its reply
                try:
                    await asyncio.wait_for(reader_idle.wait(), 5.0)
                except asyncio.TimeoutError:
                    pass
                while not events.empty():
                    item = events.get_nowait()
                    if isinstance(item, dict):
                        await conn.send(item)
                return "finished"

    async def reader() -> str:
        while True:
            kind = None
            try:
                frame = await conn.recv()
                reader_idle.clear()
                kind = frame.get("type")
                await _client_frame(state, sid, owner, frame)
                events.put_nowait({"type": "reply", "to": kind, "ok": True})
            except Gone:
                return "gone"
            except Exception as e:
                if not isinstance(e, DjinnError):  # a bug: this frame fails, the stream goes on
                    log.exception("stream frame failed")
                    e = InternalError(f"unexpected server error ({type(e).__name__})")
                state.metrics.error(e.code)
                events.put_nowait({"type": "reply", "to": kind if isinstance(kind, str) else None, "ok": False,
                                   **encode_error(e)})
            finally:
                reader_idle.set()

    w, r = asyncio.ensure_future(writer()), asyncio.ensure_future(reader())
    try:
        done, _ = await asyncio.wait({w, r}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (w, r):
            t.cancel()
    if w in done and not w.cancelled() and w.exception() is None:
        try:
            await conn.ws.close(code=1000)
        except Exception:
            pass
    elif w in done and not w.cancelled() and not isinstance(w.exception(), Gone):
        log.error("stream writer failed: %r", w.exception())
    conn.open = False  # disconnected: the engine keeps the session as it is (paused ones expire by TTL)


async def _client_frame(state: ServerState, sid: str, owner: str, frame: dict) -> None:
    kind = frame.get("type")
    if kind == "resume":
        unknown = sorted(set(frame) - {"type", "activation", "pause"})
        if unknown:
            raise InvalidRequest(f"resume frame: unknown field(s) {unknown}; fields are ['activation', 'pause']")
        act: Any = frame.get("activation")
        if act is not None:
            act = decode_tensor(act, "the resume activation")
        await state.call("resume", sid, owner, act, pause_id(frame.get("pause")))
    elif kind == "cancel":
        await state.call("cancel", sid, owner)
    elif kind in ("hello", "generate", "attach"):
        raise InvalidRequest(f"a '{kind}' frame is only valid at the start of a stream; this one is running")
    else:
        raise MalformedFrame(f"unknown frame type {shown(kind)}; during a stream the client sends 'resume' or "
                             f"'cancel'")

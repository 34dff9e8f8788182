"""What every WebSocket of the server shares: binary msgpack frames under the frame limit, the hello that
opens each socket (protocol version, then the caller's identity), and the typed error that ends one."""
from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable, Optional

from fastapi import WebSocket

from .. import __version__
from ..errors import DjinnError, FrameTooLarge, InternalError, InvalidRequest, MalformedFrame, ProtocolMismatch
from ..wire import PROTOCOL_VERSION, encode_error, mismatch_message, pack, unpack_map
from .state import ServerState

HELLO_TIMEOUT = 30.0
log = logging.getLogger("djinn.server")


class Gone(Exception):
    """The client closed the connection."""


class Conn:
    """One WebSocket of binary msgpack frames, under the server's frame limit."""

    def __init__(self, ws: WebSocket, state: ServerState):
        self.ws, self.state = ws, state
        self.open = True

    async def recv(self) -> dict:
        msg = await self.ws.receive()
        if msg["type"] == "websocket.disconnect":
            self.open = False
            raise Gone()
        data = msg.get("bytes")
        if data is None:
            raise MalformedFrame("frames must be binary msgpack, not text")
        limit = self.state.limits.max_frame_bytes
        if len(data) > limit:
            raise FrameTooLarge(f"frame of {len(data)} bytes exceeds the limit of {limit} bytes")
        return unpack_map(data)

    async def send(self, frame: dict) -> None:
        if not self.open:
            raise Gone()
        try:
            await self.ws.send_bytes(pack(frame))
        except Exception:
            self.open = False
            raise Gone() from None

    async def fatal(self, e: DjinnError, code: int = 1000) -> None:
        """Send the error that ends this socket, then close."""
        self.state.metrics.error(e.code)
        try:
            await self.send({"type": "error", **encode_error(e)})
            await self.ws.close(code=code, reason=e.message[:120])
        except Exception:
            pass
        self.open = False



async def serve_socket(ws: WebSocket, state: ServerState, serve: Callable[[Conn], Awaitable[None]], what: str) -> None:
    """Accept `ws` and run `serve(conn)` on it: a client that goes away ends it quietly, a typed error is sent
    to the client before the socket closes, and a bug is logged and told as `internal`, never to anyone else."""
    await ws.accept()
    conn = Conn(ws, state)
    try:
        await serve(conn)
    except Gone:
        pass
    except DjinnError as e:
        await conn.fatal(e)
    except Exception as e:
        log.exception("%s failed", what)
        await conn.fatal(InternalError(f"unexpected server error ({type(e).__name__})"), code=1011)


async def greet(conn: Conn, state: ServerState) -> Optional[str]:
    """The hello exchange that opens every socket: the caller's identity, or None after a protocol mismatch
    (told, and closed)."""
    try:  # the hello comes first even for a bad key, so that a client can always send it and read why
        hello = await asyncio.wait_for(conn.recv(), HELLO_TIMEOUT)
    except asyncio.TimeoutError:
        raise InvalidRequest(f"no hello frame within {HELLO_TIMEOUT:g} s") from None
    if hello.get("type") != "hello" or "protocol" not in hello:
        raise MalformedFrame("the first frame must be {'type': 'hello', 'protocol': %d}" % PROTOCOL_VERSION)
    if type(hello["protocol"]) is not int or hello["protocol"] != PROTOCOL_VERSION:
        e = ProtocolMismatch(mismatch_message(hello["protocol"]))
        await conn.fatal(e, code=1002)
        return None
    owner = state.auth.identify(conn.ws.headers)
    await conn.send({"type": "hello", "protocol": PROTOCOL_VERSION, "server": f"djinn/{__version__}",
                     "max_frame_bytes": state.limits.max_frame_bytes})
    return owner

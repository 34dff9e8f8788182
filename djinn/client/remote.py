"""The remote backend: the `Backend` protocol over WebSockets (the `websockets` sync client): control calls
over one long-lived control socket per calling thread (and per replica, behind a load balancer), each stream
over a socket of its own; non-streaming generation, the health check and, behind a balancer, new sessions over
HTTP (httpx). `djinn.connect(url, api_key=...)` gives the same `Client`, `Session` and `Checkpoint` classes,
the same events and the same typed errors as the embedded engine.

Tensors travel as safetensors bytes inside msgpack frames (see `djinn.wire`), so activations
arrive as torch tensors in the model's dtype (bfloat16 included).
"""
from __future__ import annotations

import collections
import os
import socket
import threading
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence, Union
from urllib.parse import quote

import httpx

from .. import __version__
from ..allocator import keep_freed_memory as tune_allocator
from ..calls import CALLS, Owner, activation, control_call
from ..errors import DjinnError, FrameTooLarge, InvalidRequest, ProtocolMismatch, error_from_code
from ..events import Done, Error, GenerateResult, Paused, RunDone, RunResult
from ..replica import replica_of
from ..wire import (MSGPACK, PROTOCOL_HEADER, PROTOCOL_VERSION, decode_event, decode_result, encode_intervention,
                    encode_params, encode_prompt, mismatch_message, pack, unpack)

if TYPE_CHECKING:  # websockets is imported where a socket opens
    from websockets.exceptions import ConnectionClosed

API_KEY_ENV = "DJINN_API_KEY"
# Small requests go out at once: without TCP_NODELAY a body written after its headers waits for the
# server's delayed ACK (~40 ms on Linux), on every POST and on the second of two back-to-back frames.
NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
# The id a control socket's calls act on: a load balancer in front of replicas routes the socket by it, since
# it cannot read frames (see djinn/replica.py and deploy/nginx/djinn.conf).
SESSION_HEADER = "X-Djinn-Session"


# ---------------------------------------------------------------- shared with the asyncio client

def _p(x: Any) -> str:
    return quote(str(x), safe="")


def wire_args(method: str, args: Sequence[Any]) -> list:
    """A Backend call's arguments as the control socket takes them (interventions and tensors encoded)."""
    return control_call(method).encode(args)


def routed_id(method: str, args: Sequence[Any]) -> Optional[str]:
    """The session or checkpoint id a control call acts on (None: it names none)."""
    if args and isinstance(args[0], str) and control_call(method).owner is Owner.OF_ID:
        return args[0]
    return None


def spread(method: str, health: dict) -> bool:
    """Whether the call goes over REST rather than a control socket: a new session on a server behind a
    balancer, which spreads each request, while a socket stays with the replica it opened to."""
    return method == "create_session" and health.get("replica") is not None


def rest_call(method: str, args: Sequence[Any]) -> tuple[str, str, dict]:
    """A control call with no path arguments as its REST request: verb, path, body."""
    call = control_call(method)
    return call.verb, call.path, dict(zip((a.name for a in call.in_body), call.encode(args)))


def control_result(method: str, msg: dict, call_id: int) -> Any:
    """The Backend call's return value from the control socket's reply; its typed error if it failed. A
    frame that is not this call's reply raises `OutOfStep` (the socket is then no longer usable)."""
    if msg.get("type") == "error":  # the server refused the socket itself (say, a bad key)
        raise OutOfStep(error_from_code(msg.get("code", "djinn_error"), msg.get("message", "")))
    if msg.get("type") != "reply" or msg.get("id") != call_id:
        raise OutOfStep(DjinnError(f"the server answered {method} with an unexpected frame ({msg.get('type')!r})"))
    if not msg.get("ok"):
        raise error_from_code(msg.get("code", "djinn_error"), msg.get("message", ""))
    return CALLS[method].reply.value(msg.get("result"))


class OutOfStep(Exception):
    """A control socket's frames no longer pair with its calls; carries the error to raise."""

    def __init__(self, error: DjinnError):
        self.error = error


def raise_for(status: int, content_type: str, content: bytes) -> None:
    """Re-raise the server's typed error."""
    try:
        body = unpack(content) if MSGPACK in content_type else __import__("json").loads(content)
        err = body["error"]
        raise error_from_code(err["code"], err["message"])
    except DjinnError:
        raise
    except Exception:
        raise DjinnError(f"HTTP {status} from the server: {content[:200]!r}") from None


def decode_body(content_type: str, content: bytes) -> Any:
    if MSGPACK in content_type:
        return unpack(content)
    return __import__("json").loads(content) if content else None


def hello_frame() -> bytes:
    return pack({"type": "hello", "protocol": PROTOCOL_VERSION})


def generate_frame(prompt: Any, params: dict) -> bytes:
    return pack({"type": "generate", "prompt": encode_prompt(prompt), "params": encode_params(params)})


def check_hello(msg: dict) -> int:
    """The server's hello reply: its max frame size, or the typed error it sent instead."""
    if msg.get("type") == "error":
        raise error_from_code(msg.get("code", "djinn_error"), msg.get("message", ""))
    if msg.get("type") != "hello":
        raise DjinnError(f"expected the server's hello, got {msg.get('type')!r}")
    if msg.get("protocol") != PROTOCOL_VERSION:
        raise ProtocolMismatch(mismatch_message(PROTOCOL_VERSION, msg.get("protocol")))
    return int(msg.get("max_frame_bytes") or 0)


class StreamClosed(DjinnError):
    """The stream's WebSocket closed (code "djinn_error": not one of the engine's errors)."""

    code = DjinnError.code


def closed_error(closed: ConnectionClosed) -> DjinnError:
    """The typed error for a websockets ConnectionClosed: the close frame the server sent, if any."""
    code, reason = (closed.rcvd.code, closed.rcvd.reason) if closed.rcvd else (None, "")
    if code == 1009:
        return FrameTooLarge(f"the server closed the stream: frame too large ({reason or 'message too big'})")
    return StreamClosed(f"the connection to the Djinn server closed (code {code}{': ' + reason if reason else ''})")


def frame_map(data: Union[bytes, str]) -> dict:
    """A received frame as the map every Djinn frame is (a text frame reads as an empty one)."""
    msg = unpack(data) if isinstance(data, bytes) else {}
    if not isinstance(msg, dict):
        raise DjinnError("the server sent a frame that is not a map")
    return msg


def open_socket(url: str, timeout: float) -> socket.socket:
    """A TCP connection with TCP_NODELAY for a WebSocket (the websockets client does not set it)."""
    from urllib.parse import urlsplit

    u = urlsplit(url)
    port = u.port or (443 if u.scheme == "wss" else 80)
    sock = socket.create_connection((u.hostname, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(None)
    return sock


def ws_url(url: str) -> str:
    return ("wss" + url[5:]) if url.startswith("https") else ("ws" + url[4:])


def normalize_url(url: str) -> str:
    if "://" not in url:
        url = "http://" + url
    return url.rstrip("/")


def base_headers(api_key: Optional[str]) -> dict:
    h = {PROTOCOL_HEADER: str(PROTOCOL_VERSION), "Accept": MSGPACK, "User-Agent": f"djinn-client/{__version__}"}
    if api_key:
        h["Authorization"] = f"Bearer {api_key}"
    return h


# ---------------------------------------------------------------- the sync backend

class _Stream:
    """One WebSocket: frames in order; on a stream, replies to our frames picked out of the event flow."""

    def __init__(self, ws, max_frame_bytes: int):
        self.ws, self.max_frame_bytes = ws, max_frame_bytes
        self.pending: collections.deque = collections.deque()
        self.closed = False
        self.calls = 0  # control calls sent (a control socket's frame ids)

    def recv(self, timeout: Optional[float] = None) -> dict:
        from websockets.exceptions import ConnectionClosed

        try:
            data = self.ws.recv(timeout)
        except ConnectionClosed as e:
            self.closed = True
            raise closed_error(e) from None
        return frame_map(data)

    def recv_or(self, error: DjinnError) -> dict:
        """The next frame if there is one still buffered, else `error`."""
        try:
            return self.recv()
        except DjinnError:
            raise error from None

    def next_event(self) -> dict:
        return self.pending.popleft() if self.pending else self.recv()

    def send(self, frame: bytes) -> None:
        from websockets.exceptions import ConnectionClosed

        if self.max_frame_bytes and len(frame) > self.max_frame_bytes:
            raise FrameTooLarge(f"frame of {len(frame)} bytes exceeds the server's limit of "
                                f"{self.max_frame_bytes} bytes")
        try:
            self.ws.send(frame)
        except ConnectionClosed as e:
            self.closed = True
            raise closed_error(e) from None

    def request(self, frame: dict, kind: str) -> None:
        """Send a frame and wait for the server's reply to it; events that arrive meanwhile are kept."""
        self.send(pack(frame))
        while True:
            msg = self.recv()
            if msg.get("type") == "reply" and msg.get("to") == kind:
                if not msg.get("ok"):
                    raise error_from_code(msg.get("code", "djinn_error"), msg.get("message", ""))
                return
            self.pending.append(msg)

    def close(self) -> None:
        self.closed = True
        try:
            self.ws.close()
        except Exception:
            pass


class RemoteBackend:
    def __init__(self, url: str, api_key: Optional[str] = None, *, timeout: float = 300.0,
                 connect_timeout: float = 10.0, keep_freed_memory: bool = False):
        """`keep_freed_memory`: set this process's allocator to keep freed memory (see
        `djinn.allocator.keep_freed_memory`), so that every activation received does not fault in fresh pages."""
        if keep_freed_memory:
            tune_allocator()
        self.url = normalize_url(url)
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self._headers = base_headers(self.api_key)
        self.http = httpx.Client(base_url=self.url, headers=self._headers, transport=httpx.HTTPTransport(
            socket_options=NODELAY), timeout=httpx.Timeout(timeout, connect=connect_timeout))
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self._local = threading.local()  # each calling thread's control sockets, by the replica they reach
        self._controls: list[tuple[threading.Thread, _Stream]] = []  # all of them, with their threads
        self._controls_lock = threading.Lock()
        self.health = self._request("GET", "/healthz", None)
        if self.health.get("protocol") != PROTOCOL_VERSION:
            self.http.close()
            raise ProtocolMismatch(mismatch_message(PROTOCOL_VERSION, self.health.get("protocol")))

    def _request(self, verb: str, path: str, body: Optional[dict]) -> Any:
        content = pack(body) if body is not None else None
        try:
            r = self.http.request(verb, path, content=content,
                                  headers={"Content-Type": MSGPACK} if content is not None else None)
        except httpx.TransportError as e:
            raise DjinnError(f"cannot reach the Djinn server at {self.url}: {type(e).__name__}: {e}") from None
        ctype = r.headers.get("content-type", "")
        if r.status_code >= 400:
            raise_for(r.status_code, ctype, r.content)
        return decode_body(ctype, r.content)

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """A control call over this thread's control socket: one frame each way."""
        if kwargs:  # the embedded backend accepts the engine's keyword names too
            raise InvalidRequest(f"{method}: keyword arguments {sorted(kwargs)} are not supported remotely")
        if spread(method, self.health):
            verb, path, body = rest_call(method, args)
            return CALLS[method].reply.value(self._request(verb, path, body))
        frame = {"type": "call", "method": method, "args": wire_args(method, args)}
        route = routed_id(method, args)
        s = self._control(route)
        try:
            for again in (False, True):
                s.calls += 1
                frame["id"] = s.calls
                try:
                    s.send(pack(frame))
                    break
                except StreamClosed:  # the socket had closed (a server restart, say): nothing went out
                    if again:
                        raise
                    s = self._control(route)
            return control_result(method, s.recv(self.timeout), s.calls)
        except OutOfStep as e:
            s.close()
            raise e.error from None
        except TimeoutError:
            s.close()  # its reply may still come: the socket is out of step
            raise DjinnError(f"no reply to {method} from the Djinn server within {self.timeout:g} s") from None
        except DjinnError:
            raise
        except BaseException:  # interrupted between a call and its reply: the socket is out of step
            s.close()
            raise

    def _control(self, route: Optional[str] = None) -> _Stream:
        """This thread's control socket to the replica `route` (an id) names."""
        mine = self._local.__dict__.setdefault("controls", {})
        s = mine.get(replica_of(route))
        if s is None or s.closed:
            s = _Stream(self._connect("/api/control", route), 0)
            s.send(hello_frame())
            s.max_frame_bytes = check_hello(s.recv())
            mine[replica_of(route)] = s
            with self._controls_lock:  # the sockets of threads that have ended are closed here
                ended = [c for t, c in self._controls if not t.is_alive()]
                self._controls = [(t, c) for t, c in self._controls if t.is_alive() and not c.closed]
                self._controls.append((threading.current_thread(), s))
            for c in ended:
                c.close()
        return s

    def generate(self, sid: str, prompt: Any, params: dict) -> GenerateResult:
        """To completion over one REST request (no breakpoints): no frame a token."""
        body = {"prompt": encode_prompt(prompt), **encode_params(params)}
        return decode_result(self._request("POST", f"/api/sessions/{_p(sid)}/generate", body))

    def _connect(self, path: str, route: Optional[str] = None):
        from websockets.exceptions import InvalidHandshake, InvalidStatus
        from websockets.sync.client import connect

        headers = {k: v for k, v in self._headers.items() if k != "Accept"}
        if route is not None:
            headers[SESSION_HEADER] = route
        # The TCP connect is bounded by connect_timeout; the upgrade is a request like any REST call, whose
        # response a busy server may take a while to send, so it waits as long as a REST reply would.
        options = dict(additional_headers=headers, max_size=None, compression=None, proxy=None,
                       open_timeout=self.timeout, user_agent_header=None)
        url = ws_url(self.url) + path
        try:
            options["sock"] = open_socket(url, self.connect_timeout)
            try:  # websockets >= 16 wants `legacy=True` to hand back a plain connection without a warning
                return connect(url, legacy=True, **options)
            except TypeError:
                return connect(url, **options)
        except InvalidStatus as e:
            raise DjinnError(f"the server refused the stream (HTTP {e.response.status_code})") from None
        except (InvalidHandshake, OSError, TimeoutError) as e:
            raise DjinnError(f"cannot open a stream to the Djinn server at {self.url}: {type(e).__name__}: {e}") \
                from None

    def stream(self, sid: str, prompt: Any, params: dict) -> Iterator[object]:
        return self._events(sid, generate_frame(prompt, params))  # encoded first: bad input raises here

    def attach(self, sid: str) -> Iterator[object]:
        return self._events(sid, pack({"type": "attach"}))

    def _events(self, sid: str, gen: bytes) -> Iterator[object]:
        hello = hello_frame()
        s = _Stream(self._connect(f"/api/sessions/{_p(sid)}/stream"), 0)
        finished = False
        try:
            try:
                s.send(hello)
                s.send(gen)  # pipelined: no round trip before the first token
            except DjinnError as e:  # the server may already have said why it closed (e.g. a bad key)
                s.max_frame_bytes = check_hello(s.recv_or(e))
                raise
            s.max_frame_bytes = check_hello(s.recv())
            while True:
                ev = decode_event(s.next_event())
                if isinstance(ev, Paused):
                    ev._resume = lambda act, _s=s, _sid=sid, _pid=ev.pause_id: self._resume(_s, _sid, act, _pid)
                finished = isinstance(ev, (Done, Error))
                yield ev
                if finished:
                    return
        finally:
            if not finished and not s.closed:  # the caller walked away: end the request, keep the session
                try:
                    s.request({"type": "cancel"}, "cancel")
                except Exception:
                    pass
            s.close()

    def open_run(self, model: Optional[str], window: int, params: dict) -> "RemoteRun":
        start = pack({"type": "run", "model": model, "window": window, "params": encode_params(params)})
        s = _Stream(self._connect("/api/runs"), 0)
        try:
            s.send(hello_frame())
            s.send(start)
            s.max_frame_bytes = check_hello(s.recv())
        except BaseException:
            s.close()
            raise
        return RemoteRun(s)

    def _resume(self, s: _Stream, sid: str, act: Any, pid: int) -> None:
        act = activation(act)
        if not s.closed:
            try:
                s.request({"type": "resume", "activation": act, "pause": pid}, "resume")
                return
            except StreamClosed:
                pass
        # the stream is gone (it ended, say by the pause TTL): the engine answers over the control socket
        self.call("resume", sid, act, pid)

    def close(self) -> None:
        with self._controls_lock:
            controls, self._controls = self._controls, []
        for _, s in controls:
            s.close()
        self.http.close()


class RemoteRun:
    """A run over its own WebSocket (server/runs.py; api.RunChannel)."""

    def __init__(self, s: _Stream):
        self.s, self.finished = s, False

    def feed(self, items, last: bool) -> None:
        self.s.send(pack({"type": "feed", "last": last, "items": [
            [i, encode_prompt(item.prompt), [encode_intervention(x) for x in item.interventions]]
            for i, item in items]}))

    def events(self) -> Iterator[object]:
        while True:
            try:
                msg = self.s.recv()
            except DjinnError as e:  # the server's error frame, if it sent one first, came before this
                self.finished = True
                yield Error(e)
                return
            kind = msg.get("type")
            if kind == "result":
                yield RunResult(msg["index"], decode_result(msg["result"]))
            elif kind == "run_done":
                self.finished = True
                yield RunDone(msg["n_prompts"])
                return
            else:
                self.finished = True
                yield decode_event(msg)  # the error that ended the run
                return

    def cancel(self) -> None:
        if not self.finished and not self.s.closed:  # the server cancels a run whose socket goes
            try:
                self.s.send(pack({"type": "cancel"}))
            except DjinnError:
                pass
        self.s.close()


__all__ = ["RemoteBackend"]

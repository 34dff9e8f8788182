"""The asyncio client: the same API as `djinn.connect(url)`, with coroutines.

    client = await djinn.client.aio.connect_async("http://127.0.0.1:8421", api_key="...")
    sess = await client.session()
    out = await sess.generate("Once upon a time", max_new_tokens=32)
    async for ev in sess.stream("Once", breakpoints=[djinn.Breakpoint("blocks.2.hook_resid_post")]):
        if isinstance(ev, djinn.Paused):       # an AsyncPaused: `await ev.resume(...)`
            await ev.resume(ev.activation * 0.5)
    await sess.close(); await client.close()

Events, results and errors are the same classes as the sync client's.
"""
from __future__ import annotations

import asyncio
import collections
import os
import time
from typing import Any, AsyncIterator, Optional, Sequence

import httpx
import torch

from ..calls import CALLS, activation
from ..errors import DjinnError, FrameTooLarge, ProtocolMismatch, error_from_code
from ..events import Done, Error, GenerateResult, ModelInfo, Paused, RunDone, RunResult
from ..interventions import Breakpoint
from ..replica import replica_of
from ..sites import SiteInfo
from .api import RUN_WINDOW, RunOrder, RunResults, _run_items, weight_parts
from ..wire import (MSGPACK, PROTOCOL_VERSION, decode_event, decode_result, encode_intervention, encode_params,
                    encode_prompt, mismatch_message, pack)
from .remote import (API_KEY_ENV, NODELAY, SESSION_HEADER, OutOfStep, StreamClosed, _p, base_headers, check_hello,
                     closed_error, control_result, decode_body, frame_map, generate_frame, hello_frame, normalize_url,
                     open_socket, raise_for, rest_call, routed_id, spread, wire_args, ws_url)


class AsyncPaused(Paused):
    """A Paused event whose `resume` is a coroutine: `await ev.resume()` or `await ev.resume(tensor)`."""

    async def resume(self, activation: Optional[torch.Tensor] = None) -> None:  # type: ignore[override]
        if self._resume is None:
            raise RuntimeError("this Paused event is not attached to a session")
        await self._resume(activation)


class _AsyncStream:
    def __init__(self, ws):
        self.ws, self.max_frame_bytes = ws, 0
        self.pending: collections.deque = collections.deque()
        self.closed = False
        self.lock = asyncio.Lock()
        self.calls = 0  # control calls sent (a control socket's frame ids)

    async def recv(self) -> dict:
        from websockets.exceptions import ConnectionClosed

        try:
            data = await self.ws.recv()
        except ConnectionClosed as e:
            self.closed = True
            raise closed_error(e) from None
        return frame_map(data)

    async def send(self, frame: bytes) -> None:
        from websockets.exceptions import ConnectionClosed

        if self.max_frame_bytes and len(frame) > self.max_frame_bytes:
            raise FrameTooLarge(f"frame of {len(frame)} bytes exceeds the server's limit of "
                                f"{self.max_frame_bytes} bytes")
        try:
            await self.ws.send(frame)
        except ConnectionClosed as e:
            self.closed = True
            raise closed_error(e) from None

    async def next_event(self) -> dict:
        async with self.lock:
            return self.pending.popleft() if self.pending else await self.recv()

    async def request(self, frame: dict, kind: str) -> None:
        await self.send(pack(frame))
        async with self.lock:
            while True:
                msg = await self.recv()
                if msg.get("type") == "reply" and msg.get("to") == kind:
                    if not msg.get("ok"):
                        raise error_from_code(msg.get("code", "djinn_error"), msg.get("message", ""))
                    return
                self.pending.append(msg)

    async def close(self) -> None:
        self.closed = True
        try:
            await self.ws.close()
        except Exception:
            pass


class AsyncRemoteBackend:
    def __init__(self, url: str, api_key: Optional[str] = None, *, timeout: float = 300.0,
                 connect_timeout: float = 10.0):
        self.url = normalize_url(url)
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self._headers = base_headers(self.api_key)
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self._controls: dict[Optional[str], _AsyncStream] = {}  # control sockets by the replica they reach
        self._control_lock = asyncio.Lock()  # control calls go one at a time
        self.health: dict = {}
        self.http = httpx.AsyncClient(base_url=self.url, headers=self._headers,
                                      transport=httpx.AsyncHTTPTransport(socket_options=NODELAY),
                                      timeout=httpx.Timeout(timeout, connect=connect_timeout))

    async def check(self) -> None:
        self.health = await self._request("GET", "/healthz", None)
        if self.health.get("protocol") != PROTOCOL_VERSION:
            raise ProtocolMismatch(mismatch_message(PROTOCOL_VERSION, self.health.get("protocol")))

    async def _request(self, verb: str, path: str, body: Optional[dict]) -> Any:
        content = pack(body) if body is not None else None
        try:
            r = await self.http.request(verb, path, content=content,
                                        headers={"Content-Type": MSGPACK} if content is not None else None)
        except httpx.TransportError as e:
            raise DjinnError(f"cannot reach the Djinn server at {self.url}: {type(e).__name__}: {e}") from None
        ctype = r.headers.get("content-type", "")
        if r.status_code >= 400:
            raise_for(r.status_code, ctype, r.content)
        return decode_body(ctype, r.content)

    async def call(self, method: str, *args: Any) -> Any:
        """A control call over the control socket: one frame each way (calls of concurrent tasks take turns)."""
        if spread(method, self.health):  # see remote.spread
            verb, path, body = rest_call(method, args)
            return CALLS[method].reply.value(await self._request(verb, path, body))
        frame = {"type": "call", "method": method, "args": wire_args(method, args)}
        async with self._control_lock:
            s = await self._control_socket(routed_id(method, args))
            try:
                s.calls += 1
                frame["id"] = s.calls
                await s.send(pack(frame))
                return control_result(method, await asyncio.wait_for(s.recv(), self.timeout), s.calls)
            except OutOfStep as e:
                await s.close()
                raise e.error from None
            except asyncio.TimeoutError:
                await s.close()
                raise DjinnError(f"no reply to {method} from the Djinn server within {self.timeout:g} s") from None
            except DjinnError:
                raise
            except BaseException:  # cancelled between a call and its reply: the socket is out of step
                await s.close()
                raise

    async def _control_socket(self, route: Optional[str]) -> _AsyncStream:
        """The control socket to the replica `route` (an id) names."""
        s = self._controls.get(replica_of(route))
        if s is None or s.closed:
            s = _AsyncStream(await self._connect("/api/control", route))
            await s.send(hello_frame())
            s.max_frame_bytes = check_hello(await s.recv())
            self._controls[replica_of(route)] = s
        return s

    async def _connect(self, path: str, route: Optional[str] = None):
        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidHandshake, InvalidStatus

        headers = {k: v for k, v in self._headers.items() if k != "Accept"}
        if route is not None:
            headers[SESSION_HEADER] = route
        url = ws_url(self.url) + path
        try:  # the TCP connect under connect_timeout, the upgrade's reply under timeout (as the sync client)
            sock = await asyncio.to_thread(open_socket, url, self.connect_timeout)
            sock.setblocking(False)
            return await connect(url, sock=sock, additional_headers=headers, max_size=None, compression=None,
                                 proxy=None, open_timeout=self.timeout, user_agent_header=None)
        except InvalidStatus as e:
            raise DjinnError(f"the server refused the socket (HTTP {e.response.status_code})") from None
        except (InvalidHandshake, OSError, TimeoutError) as e:
            raise DjinnError(f"cannot open a socket to the Djinn server at {self.url}: {e}") from None

    async def generate(self, sid: str, prompt: Any, params: dict) -> GenerateResult:
        from ..wire import decode_result, encode_params, encode_prompt

        body = {"prompt": encode_prompt(prompt), **encode_params(params)}
        return decode_result(await self._request("POST", f"/api/sessions/{_p(sid)}/generate", body))

    def stream(self, sid: str, prompt: Any, params: dict) -> AsyncIterator[object]:
        return self._events(sid, generate_frame(prompt, params))  # encoded first: bad input raises here

    def attach(self, sid: str) -> AsyncIterator[object]:
        return self._events(sid, pack({"type": "attach"}))

    async def _events(self, sid: str, gen: bytes) -> AsyncIterator[object]:
        hello = hello_frame()
        s = _AsyncStream(await self._connect(f"/api/sessions/{_p(sid)}/stream"))
        finished = False
        try:
            try:
                await s.send(hello)
                await s.send(gen)
            except DjinnError as e:  # the server may already have said why it closed (e.g. a bad key)
                try:
                    msg = await s.recv()
                except DjinnError:
                    raise e from None
                s.max_frame_bytes = check_hello(msg)
                raise
            s.max_frame_bytes = check_hello(await s.recv())
            while True:
                ev = decode_event(await s.next_event(), paused_cls=AsyncPaused)
                if isinstance(ev, Paused):
                    ev._resume = lambda act, _s=s, _sid=sid, _pid=ev.pause_id: self._resume(_s, _sid, act, _pid)
                finished = isinstance(ev, (Done, Error))
                yield ev
                if finished:
                    return
        finally:
            if not finished and not s.closed:
                try:
                    await asyncio.wait_for(s.request({"type": "cancel"}, "cancel"), 10)
                except BaseException:
                    pass
            await s.close()

    async def open_run(self, model: Optional[str], window: int, params: dict) -> "AsyncRemoteRun":
        start = pack({"type": "run", "model": model, "window": window, "params": encode_params(params)})
        s = _AsyncStream(await self._connect("/api/runs"))
        try:
            await s.send(hello_frame())
            await s.send(start)
            s.max_frame_bytes = check_hello(await s.recv())
        except BaseException:
            await s.close()
            raise
        return AsyncRemoteRun(s)

    async def _resume(self, s: _AsyncStream, sid: str, act: Any, pid: int) -> None:
        act = activation(act)
        if not s.closed:
            try:
                await s.request({"type": "resume", "activation": act, "pause": pid}, "resume")
                return
            except StreamClosed:
                pass
        await self.call("resume", sid, act, pid)  # the stream is gone: the engine answers over the control socket

    async def close(self) -> None:
        for s in self._controls.values():
            await s.close()
        await self.http.aclose()


class AsyncRemoteRun:
    """A run over its own WebSocket (server/runs.py), as remote.RemoteRun with coroutines."""

    def __init__(self, s: _AsyncStream):
        self.s, self.finished = s, False

    async def feed(self, items, last: bool) -> None:
        await self.s.send(pack({"type": "feed", "last": last, "items": [
            [i, encode_prompt(item.prompt), [encode_intervention(x) for x in item.interventions]]
            for i, item in items]}))

    async def next_event(self) -> object:
        try:
            msg = await self.s.recv()
        except DjinnError as e:
            self.finished = True
            return Error(e)
        kind = msg.get("type")
        if kind == "result":
            return RunResult(msg["index"], decode_result(msg["result"]))
        self.finished = True
        return RunDone(msg["n_prompts"]) if kind == "run_done" else decode_event(msg)

    async def cancel(self) -> None:
        if not self.finished and not self.s.closed:
            try:
                await self.s.send(pack({"type": "cancel"}))
            except DjinnError:
                pass
        await self.s.close()


class AsyncCheckpoint:
    def __init__(self, backend: AsyncRemoteBackend, cid: str):
        self._backend, self.id = backend, cid

    async def status(self) -> dict:
        return await self._backend.call("checkpoint_status", self.id)

    async def wait(self, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            st = await self.status()
            if st["done"] or time.monotonic() > deadline:
                return st
            await asyncio.sleep(0.005)

    async def restore(self) -> "AsyncSession":
        return AsyncSession(self._backend, await self._backend.call("restore", self.id))

    async def delete(self) -> None:
        await self._backend.call("delete_checkpoint", self.id)


class AsyncSession:
    def __init__(self, backend: AsyncRemoteBackend, sid: str):
        self._backend, self.id = backend, sid

    def __repr__(self) -> str:
        return f"AsyncSession({self.id!r})"

    async def stream(self, prompt: Any = (), *, max_new_tokens: int = 16, breakpoints: Sequence[Breakpoint] = (),
                     **params: Any) -> AsyncIterator[object]:
        """Token and AsyncPaused events (then Done); an Error event is raised as its typed error."""
        params = dict(params, max_new_tokens=max_new_tokens, breakpoints=list(breakpoints))
        async for ev in self._until_done(self._backend.stream(self.id, prompt, params)):
            yield ev

    async def attach(self) -> AsyncIterator[object]:
        """The events of the call in progress (see `djinn.Session.attach`)."""
        async for ev in self._until_done(self._backend.attach(self.id)):
            yield ev

    @staticmethod
    async def _until_done(agen: AsyncIterator[object]) -> AsyncIterator[object]:
        try:
            async for ev in agen:
                if isinstance(ev, Error):
                    raise ev.error
                yield ev
                if isinstance(ev, Done):
                    return
        finally:
            await agen.aclose()

    async def generate(self, prompt: Any = (), *, max_new_tokens: int = 16, **params: Any) -> GenerateResult:
        """Run to completion over one REST call (breakpoints belong to stream())."""
        return await self._backend.generate(self.id, prompt, dict(params, max_new_tokens=max_new_tokens))

    async def set_interventions(self, interventions: Sequence) -> None:
        await self._backend.call("set_interventions", self.id, list(interventions))

    async def info(self) -> dict:
        return await self._backend.call("session_info", self.id)

    async def checkpoint(self) -> AsyncCheckpoint:
        return AsyncCheckpoint(self._backend, await self._backend.call("checkpoint", self.id))

    async def fork(self) -> "AsyncSession":
        return AsyncSession(self._backend, await self._backend.call("fork", self.id))

    async def close(self) -> None:
        await self._backend.call("close_session", self.id)

    async def __aenter__(self) -> "AsyncSession":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class AsyncClient:
    def __init__(self, backend: AsyncRemoteBackend):
        self._backend = backend
        self._models: Optional[list[ModelInfo]] = None

    async def models(self) -> list[ModelInfo]:
        return await self._backend.call("models")

    async def session(self, model: Optional[str] = None) -> AsyncSession:
        return AsyncSession(self._backend, await self._backend.call("create_session", model))

    async def sessions(self) -> list[dict]:
        return await self._backend.call("list_sessions")

    async def sites(self, model: Optional[str] = None) -> list[SiteInfo]:
        return await self._backend.call("sites", model)

    async def weight(self, name: str, model: Optional[str] = None) -> torch.Tensor:
        """As Client.weight: a copy of a weight by its TransformerLens name, in parts."""
        if self._models is None:
            self._models = await self.models()
        parts = weight_parts(self._models, name, model)
        if parts is None:
            return await self._backend.call("weight", name, model)
        return torch.cat([await self._backend.call("weight", name, model, lo, hi) for lo, hi in parts])

    async def tokenize(self, text: str, model: Optional[str] = None, prepend_bos: Optional[bool] = None) -> list[int]:
        return await self._backend.call("tokenize", text, model, prepend_bos)

    async def to_str_tokens(self, tokens: Any, model: Optional[str] = None) -> list[str]:
        return await self._backend.call("to_str_tokens", tokens if isinstance(tokens, str) else list(tokens), model)

    async def detokenize(self, ids: Sequence[int], model: Optional[str] = None) -> str:
        return await self._backend.call("detokenize", list(ids), model)

    async def session_by_id(self, sid: str) -> AsyncSession:
        await self._backend.call("session_info", sid)  # its owner's, or a typed error
        return AsyncSession(self._backend, sid)

    async def run(self, prompts, *, model: Optional[str] = None, max_new_tokens: int = 0,
                  interventions: Sequence = (), window: int = RUN_WINDOW, **params: Any) -> RunResults:
        """As Client.run."""
        results = [r async for r in self.run_iter(prompts, model=model, max_new_tokens=max_new_tokens,
                                                  interventions=interventions, window=window, **params)]
        return RunResults(results, {s.name: s for s in await self.sites(model)})

    async def run_iter(self, prompts, *, model: Optional[str] = None, max_new_tokens: int = 0,
                       interventions: Sequence = (), window: int = RUN_WINDOW,
                       **params: Any) -> AsyncIterator[GenerateResult]:
        """As Client.run_iter (an iterable of prompts, results in their order as they come)."""
        items, shared = _run_items(prompts, interventions)
        channel = await self._backend.open_run(model, window, dict(params, max_new_tokens=max_new_tokens,
                                                                   interventions=shared))
        order = RunOrder(items, window)
        try:
            await channel.feed(*order.feed())
            while True:
                ev = await channel.next_event()
                if isinstance(ev, Error):
                    raise ev.error
                if isinstance(ev, RunDone):
                    break
                order.answered(ev)
                batch = order.feed()
                if batch is not None:
                    await channel.feed(*batch)
                for result in order.ready():
                    yield result
            for result in order.ready():
                yield result
        finally:
            await channel.cancel()

    async def close(self) -> None:
        await self._backend.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


async def connect_async(url: str, api_key: Optional[str] = None, **options: Any) -> AsyncClient:
    """An asyncio client of a running `djinn serve` (checks that it is reachable and speaks our protocol)."""
    backend = AsyncRemoteBackend(url, api_key, **options)
    try:
        await backend.check()
    except BaseException:
        await backend.close()
        raise
    return AsyncClient(backend)


__all__ = ["connect_async", "AsyncClient", "AsyncSession", "AsyncCheckpoint", "AsyncPaused"]

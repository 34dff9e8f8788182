"""One WebSocket per run of many prompts: `/api/runs` (engine/runs.py does the work).

    client -> {"type": "hello", "protocol": 1}
    server -> {"type": "hello", ...}
    client -> {"type": "run", "model": name | null, "window": W, "params": {generate's, no breakpoints}}
    client -> {"type": "feed", "items": [[index, prompt, interventions], ...], "last": bool}   (repeated)
    server -> {"type": "result", "index": i, "result": ...}   as each prompt finishes
              then {"type": "run_done", "n_prompts": N}, or {"type": "error", code, message}; then close
    client -> {"type": "cancel"}: the run ends now

At most W prompts are fed and unanswered: a feed beyond that ends the run with `limit_exceeded`. A client
that reads its results slowly holds back its own feed (the server sends each result before the next);
a client that goes away cancels its run, so no session of it outlives the socket.
"""
from __future__ import annotations

import asyncio
from typing import Optional

from fastapi import WebSocket

from ..engine.runs import RunItem
from ..errors import InvalidRequest, MalformedFrame
from ..events import Error, RunDone, RunResult
from ..validation import shown
from ..wire import decode_interventions, decode_params, decode_prompt, encode_result
from .sockets import Conn, greet, serve_socket
from .state import ServerState


async def run_endpoint(ws: WebSocket, state: ServerState) -> None:
    await serve_socket(ws, state, lambda conn: _serve(conn, state), "run")


async def _serve(conn: Conn, state: ServerState) -> None:
    owner = await greet(conn, state)
    if owner is None:
        return
    lim = state.limits
    start = await conn.recv()
    if start.get("type") != "run":
        raise MalformedFrame(f"expected a 'run' frame after hello, got type {shown(start.get('type'))}")
    unknown = sorted(set(start) - {"type", "model", "window", "params"})
    if unknown:
        raise InvalidRequest(f"run frame: unknown field(s) {unknown}; fields are ['model', 'window', 'params']")
    model, window = start.get("model"), start.get("window")
    if model is not None and not isinstance(model, str):
        raise InvalidRequest(f"model must be a name or null, got {shown(model)}")
    lim.check_run_window(window)
    params = decode_params(start.get("params"), lim.max_list_items)
    lim.check_max_new_tokens(params.get("max_new_tokens"))
    lim.check_runs(state.runs_per_key[owner])
    events: asyncio.Queue = asyncio.Queue()  # at most `window` results: the feed waits for them
    state.runs_per_key[owner] += 1
    rid: Optional[str] = None
    try:
        rid = await state.call("start_run", owner, model, state.sink(events.put_nowait), window, params)
        reader = asyncio.ensure_future(_feed(conn, state, owner, rid, model))
        writer = asyncio.ensure_future(_results(conn, events))
        try:
            done, _ = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (reader, writer):
                t.cancel()
        for t in done:
            if t.exception() is not None:
                raise t.exception()
        try:
            await conn.ws.close(code=1000)
        except Exception:  # the client closed first
            pass
    finally:
        state.runs_per_key[owner] -= 1
        if rid is not None:  # finished, failed or gone: nothing of the run stays (a finished run: a no-op)
            state.post_nowait("cancel_run", rid, owner)


async def _results(conn: Conn, events: asyncio.Queue) -> None:
    while True:
        ev = await events.get()
        if isinstance(ev, RunResult):
            await conn.send({"type": "result", "index": ev.index, "result": encode_result(ev.result)})
        elif isinstance(ev, RunDone):
            await conn.send({"type": "run_done", "n_prompts": ev.n_prompts})
            return
        elif isinstance(ev, Error):
            raise ev.error


async def _feed(conn: Conn, state: ServerState, owner: str, rid: str, model: Optional[str]) -> None:
    lim = state.limits
    loop = asyncio.get_running_loop()
    while True:
        frame = await conn.recv()
        kind = frame.get("type")
        if kind == "cancel":
            await state.call("cancel_run", rid, owner)
            return
        if kind != "feed":
            raise MalformedFrame(f"unknown frame type {shown(kind)}; during a run the client sends 'feed' or 'cancel'")
        items, last = frame.get("items"), frame.get("last", False)
        if not isinstance(items, list) or not isinstance(last, bool):
            raise InvalidRequest("a feed frame is {'items': [[index, prompt, interventions], ...], 'last': bool}")
        run_items = []
        for k, item in enumerate(items):
            if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], int)):
                raise InvalidRequest(f"feed item {k} must be [index, prompt, interventions], got {shown(item)}")
            prompt = decode_prompt(item[1], lim.max_prompt_tokens, lim.max_prompt_chars)
            if isinstance(prompt, str):  # tokenized in a worker thread: neither the loop nor the engine waits
                prompt = await loop.run_in_executor(None, state.service.engine.encode_run_prompt, model, prompt)
            run_items.append(RunItem(item[0], prompt, decode_interventions(item[2], f"prompt {item[0]}'s "
                                                                           f"interventions", lim.max_list_items)))
        await state.call("feed_run", rid, owner, run_items, last)

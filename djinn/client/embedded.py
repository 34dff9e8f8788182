"""The in-process backend: the same engine thread a server would run, called directly."""
from __future__ import annotations

import queue
from concurrent.futures import Future
from typing import Any, Callable, Iterator, Optional

from ..calls import control_call
from ..engine.engine import Engine
from ..engine.service import EngineService
from ..engine.runs import RunItem
from ..events import Done, Error, GenerateResult, Paused, RunDone

LOCAL_OWNER = "local"


class EmbeddedBackend:
    def __init__(self, engine: Engine, owner: str = LOCAL_OWNER, on_close: Optional[Callable[[], None]] = None):
        """`on_close`: runs after the engine thread stopped (a tensor-parallel group's shutdown)."""
        self.service, self.owner, self._on_close = EngineService(engine), owner, on_close

    def call(self, method: str, *args: Any) -> Any:
        """A declared control call (djinn/calls.py) for this backend's owner; its result as a remote client's."""
        call = control_call(method)
        engine_args = call.engine_args(self.owner, args)
        if call.on_engine_thread:
            result = self.service.call(method, *engine_args)
        else:
            result = getattr(self.service.engine, method)(*engine_args)
        return call.reply.value(call.reply.wire(result))

    def stream(self, sid: str, prompt, params: dict) -> Iterator[object]:
        prompt = self.service.engine.encode_prompt(sid, prompt)  # text is tokenized here, not on the engine thread
        return self._events(sid, lambda sink: self.service.call("generate", sid, self.owner, prompt, sink, **params))

    def generate(self, sid: str, prompt, params: dict) -> GenerateResult:
        """To completion with the tokens kept on the engine thread: the caller wakes once, for the result
        (many threads generating at once would otherwise each wake for every token)."""
        result: Future = Future()
        prompt = self.service.engine.encode_prompt(sid, prompt)  # text is tokenized here, not on the engine thread

        def sink(ev: object) -> None:  # on the engine thread
            if isinstance(ev, Done):
                result.set_result(ev.result)
            elif isinstance(ev, Error):
                result.set_exception(ev.error)

        self.service.call("generate", sid, self.owner, prompt, sink, **params)
        try:
            return result.result()
        except BaseException:
            if not result.done():  # the caller was interrupted: end the request, keep the session
                self.service.post("cancel", sid, self.owner)
            raise

    def attach(self, sid: str) -> Iterator[object]:
        return self._events(sid, lambda sink: self.service.call("attach", sid, self.owner, sink))

    def _events(self, sid: str, start) -> Iterator[object]:
        # SimpleQueue: its put is one C call on the engine thread, which hands out every session's token each
        # step (queue.Queue's Python-level lock and condition cost it measurably with many sessions)
        events: queue.SimpleQueue = queue.SimpleQueue()
        start(events.put)
        finished = False
        try:
            while True:
                ev = events.get()
                if isinstance(ev, Paused):
                    ev._resume = lambda act, _sid=sid, _pid=ev.pause_id: self.service.call(
                        "resume", _sid, self.owner, act, _pid)
                finished = isinstance(ev, (Done, Error))
                yield ev
                if finished:
                    return
        finally:
            if not finished:  # the caller walked away: end the request, keep the session
                try:
                    self.service.call("cancel", sid, self.owner)
                except Exception:
                    pass

    def open_run(self, model, window: int, params: dict) -> "EmbeddedRun":
        events: queue.SimpleQueue = queue.SimpleQueue()
        rid = self.service.call("start_run", self.owner, model, events.put, window, params)
        return EmbeddedRun(self, rid, model, events)

    def close(self) -> None:
        self.service.shutdown()
        if self._on_close is not None:
            self._on_close()


class EmbeddedRun:
    """A run on the engine thread (api.RunChannel): its events arrive in a queue the caller reads."""

    def __init__(self, backend: EmbeddedBackend, rid: str, model, events: queue.SimpleQueue):
        self.backend, self.id, self.model, self._events = backend, rid, model, events

    def feed(self, items, last: bool) -> None:
        engine = self.backend.service.engine  # text is tokenized here, not on the engine thread
        run_items = [RunItem(i, engine.encode_run_prompt(self.model, item.prompt), list(item.interventions))
                     for i, item in items]
        self.backend.service.call("feed_run", self.id, self.backend.owner, run_items, last)

    def events(self) -> Iterator[object]:
        while True:
            ev = self._events.get()
            yield ev
            if isinstance(ev, (RunDone, Error)):
                return

    def cancel(self) -> None:
        try:
            self.backend.service.call("cancel_run", self.id, self.backend.owner)
        except RuntimeError:  # the engine is shut down: nothing of the run is left
            pass

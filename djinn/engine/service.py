"""The engine thread: the only thread that touches the engine and the device.

Callers (the embedded client, the server's event loop) send commands through a queue; the thread runs
them between steps and steps whenever any session has work. Events reach callers through the sinks they
registered, called on this thread.
"""
from __future__ import annotations

import atexit
import gc
import logging
import queue
import sys
import threading
from concurrent.futures import Future
from typing import Any

from .engine import Engine

log = logging.getLogger("djinn.engine")
atexit.register(gc.unfreeze)  # see EngineService.__init__


class EngineService:
    def __init__(self, engine: Engine):
        # The engine thread gives up the GIL while the GPU works; with many client threads taking turns, the
        # default 5 ms switch interval could leave it waiting that long to launch the next step. (With 64 client
        # threads it measured within noise of the default; the final throughput and GPT-2 runs in
        # benchmarks/results were made with it, earlier runs in that file's history without.)
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
        # Every object alive now (the models, the libraries loaded) lives as long as the process: frozen, the
        # cyclic collector stops scanning them in each full collection, which a busy engine's allocations
        # trigger every few steps (hundreds of thousands of objects, milliseconds each time). At exit they are
        # the collector's again, so that the interpreter's last collection frees them as usual.
        gc.freeze()
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()  # polled every step: the C queue is cheapest
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="djinn-engine", daemon=True)
        self._thread.start()

    def post(self, method: str, *args: Any, **kwargs: Any) -> Future:
        """Queue `engine.<method>(*args, **kwargs)`; the future holds its result or its error."""
        if self._stopping.is_set():
            raise RuntimeError("the engine is shut down")
        fut: Future = Future()
        self._commands.put((method, args, kwargs, fut))
        return fut

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self.post(method, *args, **kwargs).result()

    def shutdown(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=10)

    def _run(self, item) -> None:
        method, args, kwargs, fut = item
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(getattr(self.engine, method)(*args, **kwargs))
        except BaseException as e:  # handed to the caller, who re-raises it
            fut.set_exception(e)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                item = self._commands.get(timeout=0 if self.engine.has_work() else 0.02)
            except queue.Empty:
                item = None
            if item is not None:
                self._settled_run(item)
                while not self._commands.empty():
                    self._settled_run(self._commands.get_nowait())
            self._guarded(self.engine.housekeeping)
            if self.engine.has_work():
                self._guarded(self.engine.step)
            elif item is None:  # nothing came in either: time to record what steps went without
                self._guarded(self.engine.idle)

    def _settled_run(self, item) -> None:
        """Run a command once every session is settled (the step in flight read), unless it touches none that
        could be in that step: feeding a run starts new sessions only, and waiting for the GPU there would
        leave it idle while the host starts the prompts."""
        if item[0] not in self.engine.UNSETTLED_COMMANDS:
            self._guarded(self.engine.drain)
        self._run(item)

    @staticmethod
    def _guarded(fn) -> None:
        try:
            fn()
        except Exception:  # keep serving everyone else
            log.exception("engine loop error")

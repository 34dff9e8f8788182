"""Engine events into the server's event loop, one loop wake-up for all that arrive together.

The engine thread hands out a step's events for every session at once. `loop.call_soon_threadsafe` per event
would write to the loop's self-pipe and contend with the loop thread for the interpreter lock once per
session; here the first event of a batch schedules one drain, and later ones only join the queue
(`benchmarks/bench_loop_handoff.py` times the two).
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
from typing import Callable

log = logging.getLogger("djinn.server")


class LoopInbox:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._items: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._scheduled = False  # a drain is due on the loop

    def put(self, fn: Callable[[object], None], arg: object) -> None:
        """From any thread: run `fn(arg)` on the loop, after everything put before it. Never raises (a closed
        loop drops it: nothing is left to read it)."""
        with self._lock:
            self._items.append((fn, arg))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:
            pass

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._items:
                    self._scheduled = False
                    return
                batch = list(self._items)
                self._items.clear()
            for fn, arg in batch:
                try:
                    fn(arg)
                except Exception:  # one stream's bug must not drop the events of the others
                    log.exception("event callback failed")

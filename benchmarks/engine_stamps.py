"""Host stamps of the engine's Paused events and resume commands, taken by wrapping them from outside, so
that the hand-offs between the engine and a client can be timed in-process or across processes
(`time.perf_counter` is the system's monotonic clock, so two processes' stamps compare)."""
from __future__ import annotations

import json
import os
import signal
import time

import djinn
from djinn.engine import engine as engine_mod, worker as worker_mod

STAMPS: list[tuple[str, float]] = []


def stamp_engine() -> None:
    """From now on, stamp each Paused event as the engine emits it and each resume command as it runs."""
    emit, resume = worker_mod._emit, engine_mod.Engine.resume

    def emit_stamped(req, event):
        if isinstance(event, djinn.Paused):
            STAMPS.append(("paused", time.perf_counter()))
        emit(req, event)

    def resume_stamped(self, *args, **kwargs):
        STAMPS.append(("resume", time.perf_counter()))
        return resume(self, *args, **kwargs)
    worker_mod._emit, engine_mod.Engine.resume = emit_stamped, resume_stamped


def dump_on_sigterm(path: str) -> None:
    """A server process: write the stamps to `path` when told to stop."""
    def dump(*_):
        with open(path, "w") as f:
            json.dump(STAMPS, f)
        os._exit(0)
    signal.signal(signal.SIGTERM, dump)


def load(path: str) -> list[tuple[str, float]]:
    with open(path) as f:
        return [(n, t) for n, t in json.load(f)]


def paused_to_client_ms(engine_stamps: list[tuple[str, float]], client_got: list[float]) -> list[float]:
    """Per client stamp, the ms since the engine emitted that Paused event: each client stamp is matched to
    the engine's last Paused before it (one pause in flight at a time)."""
    paused = [t for n, t in engine_stamps if n == "paused"]
    return [(got - max(t for t in paused if t <= got)) * 1000 for got in client_got]

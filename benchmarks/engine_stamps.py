"""Host stamps of the engine's Paused events and resume commands, taken by wrapping them from outside, so
that the hand-offs between the engine and a client can be timed in-process or across processes
(`time.perf_counter` is the system's monotonic clock, so two processes' stamps compare); and a server in a
process of its own that writes its stamps as it stops."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Iterator

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
    return [(got - paused_before(engine_stamps, got)) * 1000 for got in client_got]


def paused_before(engine_stamps: list[tuple[str, float]], t: float) -> float:
    """The engine's last Paused stamp at or before `t`."""
    return max(s for n, s in engine_stamps if n == "paused" and s <= t)


@contextlib.contextmanager
def served(argv: list[str], timeout: float = 300.0) -> Iterator[str]:
    """`python3 <argv> --port N` on a free loopback port, as a user reaches a server (client and server each
    with their own interpreter lock): yields its URL once /healthz answers; on the way out SIGTERM stops it
    (and has it write its stamps, see dump_on_sigterm)."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, *argv, "--port", str(port)])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server process exited with {proc.returncode}")
            try:
                if httpx.get(url + "/healthz", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server process did not start in {timeout:g} s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)

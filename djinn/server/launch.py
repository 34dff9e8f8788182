"""Starting a server: `run()` (what `djinn serve` calls; blocks) and `ServerThread` (uvicorn in a background
thread on a given or free port: notebooks and tests)."""
from __future__ import annotations

import ipaddress
import logging
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from ..allocator import keep_freed_memory
from ..engine.engine import Engine
from ..engine.service import EngineService
from .auth import load_api_keys
from .limits import Limits

log = logging.getLogger("djinn.server")

DEFAULT_PORT = 8421
LOOPBACK = "127.0.0.1"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _uvicorn_config(app, host: str, port: int, limits: Limits, log_level: str):
    import uvicorn

    # uvicorn drops frames beyond ws_max_size with close code 1009; ours is larger than the Djinn limit so
    # that a frame somewhat over the limit still gets a typed frame_too_large reply.
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                          ws_max_size=limits.max_frame_bytes * 2 + (1 << 20), ws="websockets-sansio",
                          lifespan="on", timeout_graceful_shutdown=5)


def run(models=None, *, host: str = LOOPBACK, port: int = DEFAULT_PORT, dtype: str = "float32",
        device: str = "cpu", kv_memory: Optional[int] = None, api_keys_file: Union[None, str, Path] = None,
        api_keys: Optional[Iterable[str]] = None, limits: Optional[Limits] = None, log_level: str = "info",
        engine: Union[None, Engine, EngineService] = None, kv_share_per_key: Optional[float] = None,
        tensor_parallel: int = 1, **engine_options) -> None:
    """Serve until interrupted. `models`: paths / repo ids / LoadedModels (None: the embedded default model),
    or pass a ready `engine`. Keys: `api_keys` plus those in `api_keys_file` and DJINN_API_KEYS; with none the
    server binds the loopback interface only. `kv_share_per_key` (None: half with API keys, all without) and
    `engine_options` go to the Engine. `tensor_parallel` N > 1 splits the models over N ranks (djinn/parallel):
    this process and N - 1 it starts, stopped when it exits."""
    import uvicorn

    from .app import create_app

    keep_freed_memory()
    keys = list(api_keys or []) + load_api_keys(api_keys_file)
    if not keys:
        if not is_loopback(host):
            print(f"djinn: no API keys configured (--api-keys FILE or DJINN_API_KEYS): refusing to listen on "
                  f"{host}; binding {LOOPBACK} only", file=sys.stderr)
            host = LOOPBACK
        else:
            print(f"djinn: no API keys configured: open to every local user, listening on {host} only",
                  file=sys.stderr)
    else:
        print(f"djinn: {len(keys)} API key(s) configured", file=sys.stderr)
    if engine is None:
        from ..models.loading import load_models

        loaded = load_models(models, dtype, device) if not _all_loaded(models) else list(models)
        if tensor_parallel > 1:
            from ..parallel.group import start

            start(loaded, tensor_parallel)
        share = kv_share_per_key if kv_share_per_key is not None else (0.5 if keys else 1.0)
        engine = Engine(loaded, kv_memory=kv_memory, kv_share_per_key=share, **engine_options)
    lim = limits or Limits()
    app = create_app(engine, api_keys=keys, limits=lim)
    eng = engine.engine if isinstance(engine, EngineService) else engine
    names = list(eng.workers)  # fixed at start
    replica = f" as replica {eng.replica}" if eng.replica else ""
    print(f"djinn: serving {', '.join(names)} on http://{host}:{port}{replica} (these names are the model ids "
          f"of /v1/models)", file=sys.stderr)
    uvicorn.Server(_uvicorn_config(app, host, port, lim, log_level)).run()


def _all_loaded(models) -> bool:
    from ..models.loading import LoadedModel

    return isinstance(models, (list, tuple)) and bool(models) and all(isinstance(m, LoadedModel) for m in models)


class ServerThread:
    """A Djinn server in a background thread of this process. `url` is ready once the constructor returns;
    `stop()` shuts it down (and the engine thread, when the app owns it)."""

    def __init__(self, engine_or_service: Union[Engine, EngineService], *, host: str = LOOPBACK, port: int = 0,
                 api_keys: Optional[Sequence[str]] = (), limits: Optional[Limits] = None,
                 log_level: str = "warning", startup_timeout: float = 30.0):
        import uvicorn

        from .app import create_app

        self.limits = limits or Limits()
        self.app = create_app(engine_or_service, api_keys=api_keys, limits=self.limits)
        self.service: EngineService = self.app.state.djinn.service
        # proto must be IPPROTO_TCP (not 0): asyncio only sets TCP_NODELAY on accepted sockets whose proto
        # says TCP, and without it every keep-alive response waits ~40 ms for a delayed ACK.
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host, self.port = host, self._sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(_uvicorn_config(self.app, host, self.port, self.limits, log_level))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                        name="djinn-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + startup_timeout
        while not self.server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self.server.started:
            self.stop()
            raise RuntimeError("the Djinn server did not start")

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=15)
        self._sock.close()

    def __enter__(self) -> "ServerThread":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

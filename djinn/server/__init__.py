"""The Djinn server: FastAPI + uvicorn over the engine thread.

`create_app(engine_or_service, api_keys=..., limits=...)` builds the app; `run(...)` serves it (what
`djinn serve` calls); `ServerThread` runs one in a background thread. Imports are lazy: importing this
package needs none of the server's dependencies.
"""
from __future__ import annotations

from typing import Any

from ..wire import PROTOCOL_VERSION


def create_app(*args: Any, **kwargs: Any):
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)


def run(*args: Any, **kwargs: Any) -> None:
    from .launch import run as _run

    _run(*args, **kwargs)


def __getattr__(name: str):
    if name in ("ServerThread", "Limits"):
        from . import launch, limits

        return {"ServerThread": launch.ServerThread, "Limits": limits.Limits}[name]
    raise AttributeError(name)


__all__ = ["create_app", "run", "ServerThread", "Limits", "PROTOCOL_VERSION"]

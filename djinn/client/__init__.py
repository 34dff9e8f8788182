"""`djinn.connect()`: the embedded engine in this process, or (with a URL) a remote Djinn server."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

from ..errors import UnknownModel
from ..models.loading import LoadedModel, load_model
from .api import Checkpoint, Client, Session

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "default_model"

ModelSpec = Union[str, LoadedModel]


def load_models(model: Union[None, ModelSpec, Sequence[ModelSpec]], dtype: str, device: str) -> list[LoadedModel]:
    """Models by path or repo id (or already loaded); None means the small model shipped with Djinn."""
    if model is None:
        if not (DEFAULT_MODEL_DIR / "config.json").exists():
            raise UnknownModel(f"the embedded default model is missing from {DEFAULT_MODEL_DIR}")
        return [load_model(str(DEFAULT_MODEL_DIR), dtype, device, name="djinn-default")]
    specs = [model] if isinstance(model, (str, LoadedModel)) else list(model)
    return [m if isinstance(m, LoadedModel) else load_model(m, dtype, device) for m in specs]


def connect(url: Optional[str] = None, *, api_key: Optional[str] = None,
            model: Union[None, ModelSpec, Sequence[ModelSpec]] = None, dtype: str = "float32",
            device: str = "cpu", timeout: float = 300.0, connect_timeout: float = 10.0,
            keep_freed_memory: bool = False, **engine_options) -> Client:
    """Without `url`: an in-process engine over `model` (default: the embedded model). With `url`: a client of a
    running `djinn serve`, same API: `timeout` bounds the wait for each reply (REST or a socket's opening),
    `connect_timeout` each TCP connect; `keep_freed_memory=True` also sets this process's allocator to keep the
    memory it frees (`djinn.allocator.keep_freed_memory`: decoding each large activation then touches no
    fresh pages; it changes the whole process, so it is the caller's choice). `engine_options` go to
    `djinn.engine.Engine` (kv_memory, kv_blocks, host_kv_blocks, block_size, max_step_tokens, pause_ttl,
    cuda_graphs)."""
    if url is not None:
        from .remote import RemoteBackend

        return Client(RemoteBackend(url, api_key, timeout=timeout, connect_timeout=connect_timeout,
                                    keep_freed_memory=keep_freed_memory))
    from ..engine.engine import Engine
    from .embedded import EmbeddedBackend

    return Client(EmbeddedBackend(Engine(load_models(model, dtype, device), **engine_options)))


__all__ = ["connect", "Client", "Session", "Checkpoint", "load_models"]

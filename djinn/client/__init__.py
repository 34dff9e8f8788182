"""`djinn.connect()`: the embedded engine in this process, or (with a URL) a remote Djinn server."""
from __future__ import annotations

from typing import Optional, Sequence, Union

from ..models.loading import ModelSpec, load_models
from .api import Checkpoint, Client, Session


def connect(url: Optional[str] = None, *, api_key: Optional[str] = None,
            model: Union[None, ModelSpec, Sequence[ModelSpec]] = None, dtype: str = "float32",
            device: str = "cpu", timeout: float = 300.0, connect_timeout: float = 10.0,
            keep_freed_memory: bool = False, tensor_parallel: int = 1, **engine_options) -> Client:
    """Without `url`: an in-process engine over `model` (default: the embedded model). With `url`: a client of a
    running `djinn serve`, same API: `timeout` bounds the wait for each reply (REST or a socket's opening),
    `connect_timeout` each TCP connect; `keep_freed_memory=True` also sets this process's allocator to keep the
    memory it frees (`djinn.allocator.keep_freed_memory`: decoding each large activation then touches no
    fresh pages; it changes the whole process, so it is the caller's choice). `tensor_parallel` N > 1 splits
    the models over N processes (this one and N - 1 it starts, one device each: djinn/parallel). `engine_options` go to
    `djinn.engine.engine.Engine` (kv_memory, kv_blocks, host_kv_blocks, block_size, max_step_tokens,
    pause_ttl, cuda_graphs, idle_ttl, kv_share_per_key, queue_timeout)."""
    if url is not None:
        from .remote import RemoteBackend

        return Client(RemoteBackend(url, api_key, timeout=timeout, connect_timeout=connect_timeout,
                                    keep_freed_memory=keep_freed_memory))
    from ..engine.engine import Engine
    from .embedded import EmbeddedBackend

    models = load_models(model, dtype, device)
    if tensor_parallel == 1:
        return Client(EmbeddedBackend(Engine(models, **engine_options)))
    from ..parallel.group import start

    leader = start(models, tensor_parallel)
    try:
        engine = Engine(models, **engine_options)
    except BaseException:
        leader.close()
        raise
    return Client(EmbeddedBackend(engine, on_close=leader.close))


__all__ = ["connect", "Client", "Session", "Checkpoint"]

"""Helpers for the server tests: the models, and a real Djinn server on a free loopback port (uvicorn in a
background thread of the test process, so tests can also look at the engine through its service)."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch

import djinn
from djinn.engine.engine import Engine
from djinn.models.config import ModelConfig
from djinn.models.loading import load_model, load_random
from djinn.server.launch import ServerThread
from djinn.server.limits import Limits

# how long the tests wait for a server to start and for a reply to their own HTTP and WebSocket calls: far
# past any loopback reply, so that a CI machine stalled for seconds fails no test, while a server that never
# answers still fails it
WAIT = 120.0

TINY = ModelConfig(family="llama", vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=64,
                   max_seq_len=128)


def make_models(stories_path) -> list:
    """stories260K (float32, real weights, a tokenizer) and a tiny random bfloat16 model (no tokenizer)."""
    return [load_model(str(stories_path), "float32", "cpu"),
            load_random(TINY, torch.bfloat16, torch.device("cpu"), seed=1, name="tiny-bf16")]


@contextlib.contextmanager
def running_server(stories_path, *, api_keys: Sequence[str] = (), limits: Optional[Limits] = None,
                   models=None, **engine_options) -> Iterator[ServerThread]:
    engine = Engine(models if models is not None else make_models(stories_path), **engine_options)
    srv = ServerThread(engine, api_keys=api_keys, limits=limits, startup_timeout=WAIT)
    try:
        yield srv
    finally:
        srv.stop()


def connect(srv: ServerThread, api_key: Optional[str] = None) -> djinn.Client:
    return djinn.connect(srv.url, api_key=api_key)

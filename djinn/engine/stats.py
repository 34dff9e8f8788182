"""Counters the engine keeps for monitoring (read by the server's /metrics)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineStats:
    steps: int = 0
    step_seconds: float = 0.0  # total wall time inside steps
    last_step_seconds: float = 0.0
    tokens_processed: int = 0  # prompt and fed tokens that went through the model
    tokens_generated: int = 0
    pauses: int = 0
    requests_finished: int = 0
    graphs_recorded: int = 0  # step segments made replayable (captured as CUDA graphs on a GPU)
    graph_record_seconds: float = 0.0  # wall time spent recording them, inside steps or at start-up

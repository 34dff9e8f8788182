"""Declarative interventions and breakpoints: plain data that a client sends, never code.

Sites use TransformerLens names (see `djinn.sites`); a `*` in a site matches every layer.
`positions` are absolute positions in the session's token history (0 is the session's first token);
`steps` select forward passes of one call: 0 is the prefill, k >= 1 the k-th decode step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import torch

StepsSpec = Union[None, str, int, Iterable[int]]


def normalize_steps(steps: StepsSpec) -> Optional[frozenset[int]]:
    """None or "all" -> None (every step); an int, list or range -> a frozen set of step indices."""
    if steps is None or (isinstance(steps, str) and steps == "all"):
        return None
    if isinstance(steps, str):
        raise ValueError(f"steps must be a list, a range, an int or 'all', not {steps!r}")
    if isinstance(steps, int):
        steps = [steps]
    out = frozenset(int(s) for s in steps)
    if any(s < 0 for s in out):
        raise ValueError("steps must be >= 0")
    return out


@dataclass(frozen=True)
class Steer:
    """Add `scale * vector` to the activation. `vector` is one per-token activation ([d_model], or
    [n_heads, d_head] at attn.hook_z), or one row per entry of `positions`."""

    site: str
    vector: torch.Tensor
    scale: float = 1.0
    positions: Optional[Sequence[int]] = None
    steps: StepsSpec = None


@dataclass(frozen=True)
class Scale:
    """Multiply the activation by `factor` (a number, or a per-token activation-shaped tensor)."""

    site: str
    factor: Union[float, torch.Tensor]
    positions: Optional[Sequence[int]] = None
    steps: StepsSpec = None


@dataclass(frozen=True)
class Replace:
    """Overwrite the activation: `tensor` is one per-token activation, or one row per entry of `positions`."""

    site: str
    tensor: torch.Tensor
    positions: Optional[Sequence[int]] = None
    steps: StepsSpec = None


@dataclass(frozen=True)
class Ablate:
    """Zero the activation, or set it to `mean` (mean ablation)."""

    site: str
    mean: Optional[torch.Tensor] = None
    positions: Optional[Sequence[int]] = None
    steps: StepsSpec = None


@dataclass(frozen=True)
class Capture:
    """Record the activation (after any edits at the same site); returned in `out.captures[(site, step)]`."""

    site: str
    steps: StepsSpec = None


@dataclass(frozen=True)
class LogitLens:
    """The logit lens at `site`, on the server: its value through the model's final norm and unembedding,
    reduced to the `top_k` tokens and their log-probabilities at each position (or only at `positions`);
    returned in `out.lens[(site, step)]` as ids and logprobs [n_positions, top_k]. Sites whose value is
    residual-shaped (the resid sites, attn_out, mlp_out; per head at attn.hook_result) take it."""

    site: str
    top_k: int = 10
    positions: Optional[Sequence[int]] = None
    steps: StepsSpec = None


@dataclass(frozen=True)
class Breakpoint:
    """Pause the session at `site` on the given steps, hand the activation to the client, wait for resume."""

    site: str
    steps: StepsSpec = 0


EDIT_TYPES = (Steer, Scale, Replace, Ablate)

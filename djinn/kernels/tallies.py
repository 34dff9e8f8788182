"""Arrival tallies: int32 slots, zero between launches, for kernels whose programs share out one result.

Each program adds one to its result's slot (releasing its part) once its part is written; the program that
brings the count to the number of parts acquires the others' parts, finishes the result and sets the slot
back to zero. The kernel needs no second launch to combine the parts, and the slots are zero again when it
ends. Two launches that can overlap must not share slots: an engine owns one buffer, and its launches follow
one another on its stream.
"""
from __future__ import annotations

from typing import Optional

import torch


def new(n_slots: int, device: torch.device) -> torch.Tensor:
    """A zeroed buffer of `n_slots` tallies."""
    return torch.zeros(n_slots, dtype=torch.int32, device=device)


def slots(tallies: Optional[torch.Tensor], n_slots: int, device: torch.device) -> torch.Tensor:
    """The buffer a launch needing `n_slots` uses: `tallies`, or without one a fresh buffer for this launch
    alone (one more kernel, the zeroing)."""
    if tallies is None:
        return new(n_slots, device)
    if tallies.numel() < n_slots:
        raise ValueError(f"a launch needs {n_slots} tallies and its buffer holds {tallies.numel()}")
    return tallies

"""Copies of device tensors into host memory that the engine does not wait for.

On a GPU the copy goes into pinned memory on a side stream, ordered after the compute that produced the
tensor by stream waiting, and completion is polled through a CUDA event; on the CPU it is a plain copy.
"""
from __future__ import annotations

from typing import Optional

import torch

from .side_stream import SideStream


class Staged:
    def __init__(self, tensor: torch.Tensor, event: Optional[torch.cuda.Event]):
        self.tensor, self._event = tensor, event

    def ready(self) -> bool:
        return self._event is None or self._event.query()

    def result(self) -> torch.Tensor:
        if self._event is not None:
            self._event.synchronize()
        return self.tensor


class StagedPart:
    """One entry (an int) or a range (a slice) of the first dimension of a staged tensor."""

    def __init__(self, staged: Staged, index: int | slice):
        self.staged, self.index = staged, index

    def ready(self) -> bool:
        return self.staged.ready()

    def result(self) -> torch.Tensor:
        return self.staged.result()[self.index].clone()


class HostStager:
    def __init__(self, device: torch.device):
        self.device = device
        self._side = SideStream(device) if device.type == "cuda" else None

    def stage(self, t: torch.Tensor) -> Staged:
        if self._side is None:
            return Staged(t.clone(), None)
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        with self._side.after_compute() as side:
            host.copy_(t, non_blocking=True)
            t.record_stream(side)
            event = torch.cuda.Event()
            event.record(side)
        return Staged(host, event)

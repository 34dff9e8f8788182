"""The paged KV cache: fixed-size blocks on the device, reference-counted for copy-on-write forks, and a
host pool (pinned when the device is a GPU) for swapped-out sessions and checkpoints.

One tensor holds every block: [n_blocks, n_layers, 2, block_size, n_kv_heads, d_head]. A block is
contiguous across all layers, so moving a session between device and host is one copy per run of
consecutive blocks.
"""
from __future__ import annotations

import heapq
from typing import Optional

import torch

from ..errors import CapacityError
from ..models.config import ModelConfig
from .side_stream import SideStream


class BlockAllocator:
    """Free blocks and reference counts for `n_blocks` blocks. The lowest free ids go first, so a session's
    blocks tend to be consecutive even after others came and went: moving it is then a few large copies."""

    def __init__(self, n_blocks: int):
        self.n_blocks = n_blocks
        self._free = list(range(n_blocks))  # a heap
        self.refcount = [0] * n_blocks

    @property
    def n_free(self) -> int:
        return len(self._free)

    @property
    def n_used(self) -> int:
        return self.n_blocks - len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise CapacityError(f"needs {n} KV blocks, {len(self._free)} free of {self.n_blocks}")
        ids = [heapq.heappop(self._free) for _ in range(n)]
        for i in ids:
            self.refcount[i] = 1
        return ids

    def incref(self, ids: list[int]) -> None:
        for i in ids:
            self.refcount[i] += 1

    def decref(self, ids: list[int]) -> None:
        for i in ids:
            self.refcount[i] -= 1
            if self.refcount[i] == 0:
                heapq.heappush(self._free, i)


def runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """(first source, first destination, length) of each stretch where both block lists count up by one:
    a session's blocks mostly come from the allocator in order, so most moves are a few large copies."""
    out: list[tuple[int, int, int]] = []
    for a, b in zip(src, dst):
        if out and a == out[-1][0] + out[-1][2] and b == out[-1][1] + out[-1][2]:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
        else:
            out.append((a, b, 1))
    return out


class CopyJob:
    """A device<->host block copy; on a GPU it runs on a side stream and `done()` polls its event."""

    def __init__(self, n_bytes: int, start: Optional[torch.cuda.Event] = None,
                 end: Optional[torch.cuda.Event] = None):
        self.n_bytes, self._start, self._event = n_bytes, start, end

    def done(self) -> bool:
        return self._event is None or self._event.query()

    def wait(self) -> None:
        if self._event is not None:
            self._event.synchronize()

    def gpu_seconds(self) -> Optional[float]:
        """Time the copy took on the GPU's side stream (None on the CPU or while running)."""
        if self._start is None or not self.done():
            return None
        return self._start.elapsed_time(self._event) / 1000.0


class KVPool:
    def __init__(self, cfg: ModelConfig, n_blocks: int, n_host_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device):
        if n_blocks < 1:
            raise CapacityError("the KV memory budget holds no block at all")
        self.block_size, self.device = block_size, device
        shape = (cfg.n_layers, 2, block_size, cfg.n_kv_heads, cfg.d_head)
        self.kv = torch.zeros((n_blocks, *shape), dtype=dtype, device=device)
        self.host = torch.zeros((max(n_host_blocks, 0), *shape), dtype=dtype,
                                pin_memory=device.type == "cuda")
        self.device_blocks = BlockAllocator(n_blocks)
        self.host_blocks = BlockAllocator(max(n_host_blocks, 0))
        self._side = SideStream(device) if device.type == "cuda" else None

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        return cfg.n_layers * 2 * block_size * cfg.n_kv_heads * cfg.d_head * torch.empty((), dtype=dtype).itemsize

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def copy_block(self, src: int, dst: int) -> None:
        """Device to device (copy-on-write of a shared block)."""
        self.kv[dst].copy_(self.kv[src])

    def copy_host(self, src: list[int], dst: list[int]) -> None:
        """Host to host (a checkpoint of a swapped-out session); copies queued between the pools first."""
        self.settle()
        for s, d, k in runs(src, dst):
            self.host[d:d + k].copy_(self.host[s:s + k])

    def to_host(self, device_ids: list[int], host_ids: list[int], fence: bool = False) -> CopyJob:
        """Start copying device blocks into host blocks. Either the device blocks stay allocated until done(),
        or `fence` orders all later compute after the copy, so the blocks may be reused at once."""
        n_bytes = len(device_ids) * self.kv[0].numel() * self.kv.element_size()
        if self._side is None:
            for d, h, k in runs(device_ids, host_ids):
                self.host[h:h + k].copy_(self.kv[d:d + k])
            return CopyJob(n_bytes)
        with self._side.after_compute() as side:
            start, event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(side)
            for d, h, k in runs(device_ids, host_ids):
                self.host[h:h + k].copy_(self.kv[d:d + k], non_blocking=True)
            event.record(side)
        if fence:
            self._side.compute.wait_event(event)
        return CopyJob(n_bytes, start, event)

    def settle(self) -> None:
        """Wait for every queued copy between the pools, before the host touches host blocks itself (swap-outs
        are fenced into the compute stream, so waiting for it covers them too)."""
        if self._side is not None:
            self._side.compute.synchronize()

    def to_device(self, host_ids: list[int], device_ids: list[int]) -> None:
        """Copy host blocks into device blocks, ordered before any later work on the compute stream."""
        for h, d, k in runs(host_ids, device_ids):
            self.kv[d:d + k].copy_(self.host[h:h + k], non_blocking=True)

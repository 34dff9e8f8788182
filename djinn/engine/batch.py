"""Pack the rows of one engine step into a flat varlen batch: positions, KV slots and attention metadata."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from ..models.attention import AttentionMetadata
from ..models.context import ForwardContext


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without a host sync: a copy from pageable memory would wait for the GPU's
    queue to drain, one from pinned memory is queued like any kernel."""
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


@dataclass
class RowSpan:
    """Where one row's tokens sit in the cache: positions start .. start + n_tokens - 1."""

    start: int
    n_tokens: int
    block_table: list[int]


def build_context(spans: list[RowSpan], tokens: list[int], kv: torch.Tensor, block_size: int,
                  device: torch.device, feed: Sequence[tuple[int, int]] = (),
                  sampled: Optional[torch.Tensor] = None, use_kernel: Optional[bool] = None,
                  tallies: Optional[torch.Tensor] = None) -> tuple[ForwardContext, torch.Tensor]:
    """The forward context of a step over `spans`, and the flat token ids on the device. `feed` lists
    (token index, index into `sampled`) for tokens the previous step sampled and the host has not seen yet.
    The padded layout of the portable attention path is built only when the Triton kernel does not run;
    `tallies` are the engine's arrival tallies the kernel may use."""
    if use_kernel is None:
        use_kernel = device.type == "cuda"
    # index arithmetic in numpy: a prefill's step pays for it before its first kernel (torch's per-op cost on
    # the host is several times numpy's for arrays this small)
    n_rows = len(spans)
    lens = np.array([s.n_tokens for s in spans], dtype=np.int64)
    starts = np.array([s.start for s in spans], dtype=np.int64)
    n_tbl = max(len(s.block_table) for s in spans)
    tables = np.zeros((n_rows, n_tbl), dtype=np.int64)
    for r, s in enumerate(spans):
        tables[r, : len(s.block_table)] = s.block_table
    row_of_token = np.repeat(np.arange(n_rows), lens)
    positions = starts[row_of_token] + np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
    n = len(positions)
    # every integer input in one host buffer: one copy to the device
    packed = np.concatenate([np.asarray(tokens, dtype=np.int64), positions, tables[row_of_token, positions // block_size],
                             positions % block_size, row_of_token, tables.ravel() if use_kernel else [],
                             np.asarray(feed, dtype=np.int64).reshape(-1, 2).T.ravel()]).astype(np.int64)
    dev = to_device(torch.from_numpy(packed), device)
    tok, pos, w_blocks, w_offsets, rows = dev[:5 * n].view(5, n)
    if feed:
        dst, src = dev[len(packed) - 2 * len(feed):].view(2, -1)
        tok = tok.index_copy(0, dst, sampled.index_select(0, src))
    n_tables = tables.size if use_kernel else 0
    meta = AttentionMetadata(
        write_blocks=w_blocks, write_offsets=w_offsets,
        block_tables=dev[5 * n:5 * n + n_tables].view(n_rows, n_tbl) if use_kernel else torch.from_numpy(tables),
        token_row=rows, token_pos=pos, max_context=int((starts + lens).max()),
        prefill=bool(lens.max() > 1), tallies=tallies,
    )
    if not use_kernel:  # the portable path runs where the host is (tests, CPU serving)
        portable_layout(meta, torch.from_numpy(starts), torch.from_numpy(lens), torch.from_numpy(tables), block_size,
                        device)
    return ForwardContext(positions=pos, attention=meta, kv=kv), tok


def portable_layout(meta: AttentionMetadata, starts: torch.Tensor, lens: torch.Tensor, tables: torch.Tensor,
                    block_size: int, device: torch.device) -> None:
    """Fill in the padded layout the portable attention path reads: each row's queries and context keys
    side by side, with a causal mask (each layer adds its own window: attention.window_mask). `starts`,
    `lens` and `tables` are host tensors."""
    n_rows = len(starts)
    row_of_token = torch.repeat_interleave(torch.arange(n_rows), lens)
    col_of_token = torch.arange(int(lens.sum())) - torch.repeat_interleave(lens.cumsum(0) - lens, lens)
    ctx_lens = starts + lens
    max_q, max_ctx = int(lens.max()), int(ctx_lens.max())
    key_pos = torch.arange(max_ctx)
    query_pos = starts[:, None] + torch.arange(max_q)[None, :]  # [B, T]
    mask = (key_pos[None, None, :] <= query_pos[:, :, None]) & (key_pos[None, None, :] < ctx_lens[:, None, None])
    padding = torch.arange(max_q)[None, :] >= lens[:, None]
    mask[:, :, 0] |= padding  # padding queries: keep softmax finite
    meta.query_row, meta.query_col = row_of_token.to(device), col_of_token.to(device)
    meta.kv_blocks = tables[:, key_pos // block_size].long().to(device)
    meta.kv_offsets = (key_pos % block_size).expand(n_rows, -1).to(device)
    meta.mask, meta.max_query_len = mask[:, None].to(device), max_q
    meta.query_pos = query_pos.masked_fill(padding, -1)[:, None, :, None].to(device)
    meta.seen = mask.any(dim=1)[:, None, :, None].to(device)

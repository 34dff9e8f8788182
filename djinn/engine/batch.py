"""Pack the rows of one engine step into a flat varlen batch: positions, KV slots and attention metadata."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

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
                  sliding_window: Optional[int], device: torch.device, feed: Sequence[tuple[int, int]] = (),
                  sampled: Optional[torch.Tensor] = None,
                  use_kernel: Optional[bool] = None) -> tuple[ForwardContext, torch.Tensor]:
    """The forward context of a step over `spans`, and the flat token ids on the device. `feed` lists
    (token index, index into `sampled`) for tokens the previous step sampled and the host has not seen yet.
    The padded layout of the portable attention path is built only when the Triton kernel does not run."""
    if use_kernel is None:
        use_kernel = device.type == "cuda"
    n_rows = len(spans)
    lens = torch.tensor([s.n_tokens for s in spans])
    starts = torch.tensor([s.start for s in spans])
    n_tbl = max(len(s.block_table) for s in spans)
    tables = torch.zeros(n_rows, n_tbl, dtype=torch.long)
    for r, s in enumerate(spans):
        tables[r, : len(s.block_table)] = torch.tensor(s.block_table, dtype=torch.long)
    row_of_token = torch.repeat_interleave(torch.arange(n_rows), lens)
    col_of_token = torch.arange(int(lens.sum())) - torch.repeat_interleave(lens.cumsum(0) - lens, lens)
    positions = starts[row_of_token] + col_of_token
    n, n_tables = positions.shape[0], tables.numel() if use_kernel else 0
    # every integer input in one host buffer: one copy to the device
    feed_pairs = torch.tensor(feed, dtype=torch.long).view(-1, 2).T.flatten()
    packed = torch.cat([torch.tensor(tokens, dtype=torch.long), positions, tables[row_of_token, positions // block_size]
                        .long(), positions % block_size, row_of_token, tables.flatten().long()[:n_tables], feed_pairs])
    dev = to_device(packed, device)
    tok, pos, w_blocks, w_offsets, rows = dev[:5 * n].view(5, n)
    if feed:
        dst, src = dev[len(packed) - 2 * len(feed):].view(2, -1)
        tok = tok.index_copy(0, dst, sampled.index_select(0, src))
    meta = AttentionMetadata(
        write_blocks=w_blocks, write_offsets=w_offsets,
        block_tables=dev[5 * n:5 * n + n_tables].view(n_rows, n_tbl) if use_kernel else tables,
        token_row=rows, token_pos=pos, window=sliding_window or 0, max_context=int((starts + lens).max()),
    )
    if not use_kernel:  # the portable path runs where the host is (tests, CPU serving)
        portable_layout(meta, starts, lens, tables, block_size, sliding_window, device)
    return ForwardContext(positions=pos, attention=meta, kv=kv), tok


def portable_layout(meta: AttentionMetadata, starts: torch.Tensor, lens: torch.Tensor, tables: torch.Tensor,
                    block_size: int, sliding_window: Optional[int], device: torch.device) -> None:
    """Fill in the padded layout the portable attention path reads: each row's queries and context keys
    side by side, with a causal (and sliding-window) mask. `starts`, `lens` and `tables` are host tensors."""
    n_rows = len(starts)
    row_of_token = torch.repeat_interleave(torch.arange(n_rows), lens)
    col_of_token = torch.arange(int(lens.sum())) - torch.repeat_interleave(lens.cumsum(0) - lens, lens)
    ctx_lens = starts + lens
    max_q, max_ctx = int(lens.max()), int(ctx_lens.max())
    key_pos = torch.arange(max_ctx)
    query_pos = starts[:, None] + torch.arange(max_q)[None, :]  # [B, T]
    mask = (key_pos[None, None, :] <= query_pos[:, :, None]) & (key_pos[None, None, :] < ctx_lens[:, None, None])
    if sliding_window is not None:
        mask &= query_pos[:, :, None] - key_pos[None, None, :] < sliding_window
    mask[:, :, 0] |= torch.arange(max_q)[None, :] >= lens[:, None]  # padding queries: keep softmax finite
    meta.query_row, meta.query_col = row_of_token.to(device), col_of_token.to(device)
    meta.kv_blocks = tables[:, key_pos // block_size].long().to(device)
    meta.kv_offsets = (key_pos % block_size).expand(n_rows, -1).to(device)
    meta.mask, meta.max_query_len = mask[:, None].to(device), max_q

"""Pack the rows of one engine step into a flat varlen batch: positions, KV slots and attention metadata."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..models.attention import AttentionMetadata
from ..models.context import ForwardContext


@dataclass
class RowSpan:
    """Where one row's tokens sit in the cache: positions start .. start + n_tokens - 1."""

    start: int
    n_tokens: int
    block_table: list[int]


def build_context(spans: list[RowSpan], tokens: list[int], kv: torch.Tensor, block_size: int,
                  sliding_window: Optional[int], device: torch.device) -> tuple[ForwardContext, torch.Tensor]:
    """The forward context of a step over `spans`, and the flat token ids on the device."""
    n_rows = len(spans)
    lens = torch.tensor([s.n_tokens for s in spans])
    starts = torch.tensor([s.start for s in spans])
    ctx_lens = starts + lens
    max_q, max_ctx = int(lens.max()), int(ctx_lens.max())
    n_tbl = max(len(s.block_table) for s in spans)
    tables = torch.zeros(n_rows, n_tbl, dtype=torch.long)
    for r, s in enumerate(spans):
        tables[r, : len(s.block_table)] = torch.tensor(s.block_table, dtype=torch.long)

    row_of_token = torch.repeat_interleave(torch.arange(n_rows), lens)
    col_of_token = torch.arange(int(lens.sum())) - torch.repeat_interleave(lens.cumsum(0) - lens, lens)
    positions = starts[row_of_token] + col_of_token

    key_pos = torch.arange(max_ctx)
    query_pos = starts[:, None] + torch.arange(max_q)[None, :]  # [B, T]
    mask = (key_pos[None, None, :] <= query_pos[:, :, None]) & (key_pos[None, None, :] < ctx_lens[:, None, None])
    if sliding_window is not None:
        mask &= query_pos[:, :, None] - key_pos[None, None, :] < sliding_window
    padded_query = torch.arange(max_q)[None, :] >= lens[:, None]
    mask[:, :, 0] |= padded_query  # padding queries attend one key so softmax stays finite; outputs are dropped

    meta = AttentionMetadata(
        write_blocks=tables[row_of_token, positions // block_size].to(device),
        write_offsets=(positions % block_size).to(device),
        query_row=row_of_token.to(device),
        query_col=col_of_token.to(device),
        kv_blocks=tables[:, key_pos // block_size].to(device),
        kv_offsets=(key_pos % block_size).expand(n_rows, -1).to(device),
        mask=mask[:, None].to(device),
        n_rows=n_rows,
        max_query_len=max_q,
    )
    ctx = ForwardContext(positions=positions.to(device), attention=meta, kv=kv)
    return ctx, torch.tensor(tokens, dtype=torch.long).to(device)

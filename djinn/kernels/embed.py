"""The start of a one-token step on the GPU, in Triton: each token's id, taken from the previous step's
sampled ids where the host has not seen them yet, and its embedding row, plus its position's row where the
model has learned positions (GPT-2).

In PyTorch these are seven kernels of 1-2 us each in every CUDA graph (compare, clamp, gather and select for
the ids; two gathers and an add for the rows), here two. The add computes in float32 and rounds once, as
PyTorch's does, so the rows are the same bits.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import dependent_launch
from .dependent_launch import wait_for_inputs

BLOCK = 1024  # ids, or row elements, a program


@triton.jit
def _fed_tokens_kernel(tok_ptr, src_ptr, sampled_ptr, out_ptr, n, BLOCK: tl.constexpr, DEPENDENT: tl.constexpr):
    wait_for_inputs(DEPENDENT)
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    src = tl.load(src_ptr + i, mask=mask, other=-1)
    fed = tl.load(sampled_ptr + src, mask=mask & (src >= 0), other=0)
    tl.store(out_ptr + i, tl.where(src >= 0, fed, tl.load(tok_ptr + i, mask=mask, other=0)), mask=mask)


def fed_tokens(tokens: torch.Tensor, feed_from: torch.Tensor, sampled: torch.Tensor) -> torch.Tensor:
    """tokens: [N] ids; feed_from: [N], an index into `sampled` or -1. Returns [N]: sampled[feed_from] where
    feed_from >= 0, else tokens."""
    out = torch.empty_like(tokens)
    n = tokens.shape[0]
    if n:
        _fed_tokens_kernel[(triton.cdiv(n, BLOCK),)](tokens, feed_from, sampled, out, n, BLOCK=BLOCK, num_warps=4,
                                                     **dependent_launch.options())
    return out


@triton.jit
def _embed_kernel(tok_ptr, table_ptr, pos_ptr, pos_table_ptr, out_ptr, stride_t, stride_p, stride_o, n_cols,
                  BLOCK: tl.constexpr, HAS_POS: tl.constexpr, DEPENDENT: tl.constexpr):
    wait_for_inputs(DEPENDENT)
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    row = tl.load(table_ptr + tl.load(tok_ptr + t).to(tl.int64) * stride_t + cols, mask=mask, other=0.0)
    if HAS_POS:
        pos_row = tl.load(pos_table_ptr + tl.load(pos_ptr + t).to(tl.int64) * stride_p + cols, mask=mask, other=0.0)
        row = row.to(tl.float32) + pos_row.to(tl.float32)
    tl.store(out_ptr + t * stride_o + cols, row.to(out_ptr.dtype.element_ty), mask=mask)


def embed(table: torch.Tensor, tokens: torch.Tensor, pos_table: Optional[torch.Tensor] = None,
          positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """table[tokens] (+ pos_table[positions]): [N, d]. Rows with unit stride along d."""
    n, d = tokens.shape[0], table.shape[1]
    out = torch.empty((n, d), dtype=table.dtype, device=table.device)
    if n:
        has_pos = pos_table is not None
        _embed_kernel[(n, triton.cdiv(d, BLOCK))](
            tokens, table, positions if has_pos else tokens, pos_table if has_pos else table, out, table.stride(0),
            pos_table.stride(0) if has_pos else 0, out.stride(0), d, BLOCK=BLOCK, HAS_POS=has_pos, num_warps=4,
            **dependent_launch.options())
    return out

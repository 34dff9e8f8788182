"""Paged attention for a flat varlen batch, in Triton.

One program per (query token, KV head) computes all query heads that share that KV head (GQA). It walks
the token's row of the block table up to its own position (inside the sliding window, if any) with an
online softmax in float32. Keys are visited in a fixed order, so results are bit-reproducible, and all
metadata lives in device tensors, so the kernel can be captured in a CUDA graph.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_attention_kernel(
    q_ptr, kv_ptr, out_ptr, tables_ptr, rows_ptr, pos_ptr,
    stride_qn, stride_qh, stride_blk, stride_kv, stride_tok, stride_head, stride_table, stride_on, stride_oh,
    scale, window,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
):
    tok = tl.program_id(0)
    kv_head = tl.program_id(1)
    row = tl.load(rows_ptr + tok).to(tl.int64)
    pos = tl.load(pos_ptr + tok).to(tl.int32)
    g = tl.arange(0, GROUP_P)
    d = tl.arange(0, D_P)
    heads = kv_head * GROUP + g
    qd_mask = (g < GROUP)[:, None] & (d < D)[None, :]
    q = tl.load(q_ptr + tok.to(tl.int64) * stride_qn + heads[:, None] * stride_qh + d[None, :], mask=qd_mask,
                other=0.0).to(tl.float32)

    first = pos * 0
    if window > 0:
        first = tl.maximum(pos - window + 1, 0)
    m = tl.full([GROUP_P], float("-inf"), tl.float32)
    denom = tl.zeros([GROUP_P], tl.float32)
    acc = tl.zeros([GROUP_P, D_P], tl.float32)
    start = first
    while start <= pos:  # a while loop: Triton's CPU interpreter cannot take a tensor bound in range()
        kp = start + tl.arange(0, BLOCK_N)
        valid = kp <= pos
        block = tl.load(tables_ptr + row * stride_table + kp // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        base = block * stride_blk + (kp % BLOCK_SIZE) * stride_tok + kv_head * stride_head
        kv_mask = valid[:, None] & (d < D)[None, :]
        k = tl.load(kv_ptr + base[:, None] + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        denom = denom * alpha + tl.sum(p, axis=1)
        v = tl.load(kv_ptr + base[:, None] + stride_kv + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
        start += BLOCK_N
    out = acc / denom[:, None]
    tl.store(out_ptr + tok.to(tl.int64) * stride_on + heads[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=qd_mask)


def paged_attention_triton(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
                           token_row: torch.Tensor, token_pos: torch.Tensor, scale: float,
                           window: int) -> torch.Tensor:
    """q: [N, n_heads, d_head]; kv_layer: [n_blocks, 2, block_size, n_kv_heads, d_head] (any strides with a
    contiguous last dim); block_tables: [B, max_blocks]; token_row, token_pos: [N]. Returns [N, n_heads, d_head]."""
    n, n_heads, d_head = q.shape
    n_kv = kv_layer.shape[3]
    group = n_heads // n_kv
    out = torch.empty_like(q)
    if n == 0:
        return out
    d_p = triton.next_power_of_2(d_head)
    group_p = triton.next_power_of_2(group)
    block_n = max(16, min(64, 8192 // (group_p * d_p)))
    _paged_attention_kernel[(n, n_kv)](
        q, kv_layer, out, block_tables, token_row, token_pos,
        q.stride(0), q.stride(1), kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3),
        block_tables.stride(0), out.stride(0), out.stride(1),
        scale, window,
        GROUP=group, GROUP_P=group_p, D=d_head, D_P=d_p, BLOCK_SIZE=kv_layer.shape[2], BLOCK_N=block_n,
        num_warps=4,
    )
    return out

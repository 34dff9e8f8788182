"""Greedy decoding's pick, the index of each row's largest logit, in Triton.

PyTorch's argmax reduces one row of a large vocabulary in a single block (15 us for GPT-2's 50257 logits on
an H200, more than any other kernel of its one-token step); here one program streams a row with several
tiles in flight. The result is torch.argmax's: the first index of the maximum, a NaN counting as the
maximum.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048
NUM_WARPS = 8
NUM_STAGES = 3


@triton.jit
def _better(v, i, best_v, best_i):
    """Whether (v, i) beats (best_v, best_i): larger, or NaN over a number, or equal at a smaller index."""
    v_nan, b_nan = v != v, best_v != best_v
    return (v > best_v) | (v_nan & ~b_nan) | (((v == best_v) | (v_nan & b_nan)) & (i < best_i))


@triton.jit
def _argmax_kernel(x_ptr, out_ptr, stride_x, V, BLOCK: tl.constexpr, NUM_STAGES: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    best_v = tl.full([BLOCK], float("-inf"), tl.float32)
    best_i = tl.full([BLOCK], 2147483647, tl.int32)
    for start in tl.range(0, V, BLOCK, num_stages=NUM_STAGES):
        idx = start + cols
        mask = idx < V
        v = tl.load(x_ptr + row * stride_x + idx, mask=mask, other=float("-inf")).to(tl.float32)
        take = mask & _better(v, idx, best_v, best_i)
        best_v = tl.where(take, v, best_v)
        best_i = tl.where(take, idx, best_i)
    # across the lanes: the first NaN if there is one, else the first index of the maximum
    is_nan = best_v != best_v
    if tl.max(is_nan.to(tl.int32), axis=0) > 0:
        winners = is_nan
    else:
        winners = best_v == tl.max(best_v, axis=0)
    tl.store(out_ptr + row, tl.min(tl.where(winners, best_i, 2147483647), axis=0).to(tl.int64))


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits: [B, V] with unit stride along V. Returns [B] int64, as logits.argmax(-1)."""
    out = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    if logits.shape[0]:
        _argmax_kernel[(logits.shape[0],)](logits, out, logits.stride(0), logits.shape[1], BLOCK=BLOCK,
                                           NUM_STAGES=NUM_STAGES, num_warps=NUM_WARPS)
    return out

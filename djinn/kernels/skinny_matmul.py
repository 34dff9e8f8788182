"""Matrix product for steps of a few rows (decode of up to 64 sessions): out[M, N] = x[M, K] @ W[N, K]^T (+ bias),
in Triton.

With few rows the product is a stream through the weights. Each program owns BLOCK_N weight rows and every
input row (one 64-row tile, the rows past M masked to zero), walks all of K in order, and keeps several
tiles in flight. The tile is 64 rows whatever M is, so a row's result does not depend on how many other rows
share the step. On an H200 it streams about as fast as cuBLAS for aligned shapes and four times faster where
the output's rows are not 16-byte aligned (benchmarks/bench_skinny_matmul.py), which is where it is used.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

MAX_ROWS = 64  # one tile of input rows; larger steps go to cuBLAS

# From benchmarks/bench_skinny_matmul.py on an H200 (results in benchmarks/results): the best setting for
# GPT-2's head at every row count.
BLOCK_N = 64
BLOCK_K = 64
NUM_WARPS = 4
NUM_STAGES = 4


@triton.jit(do_not_specialize=["M"])  # one compiled kernel for every row count
def _skinny_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, stride_xm, stride_wn, stride_om, K: tl.constexpr,
                   HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr):
    rows = tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_mask, col_mask = rows < M, cols < N
    x_base = x_ptr + rows[:, None] * stride_xm
    w_base = w_ptr + cols[:, None].to(tl.int64) * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        if EVEN_K:
            x = tl.load(x_base + (k + ks)[None, :], mask=row_mask[:, None], other=0.0)
            w = tl.load(w_base + (k + ks)[None, :], mask=col_mask[:, None], other=0.0)
        else:
            k_mask = k + ks < K
            x = tl.load(x_base + (k + ks)[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_base + (k + ks)[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


def skinny_matmul(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x: [M, K] with M <= MAX_ROWS, weight: [N, K]; both with unit stride along K. Returns [M, N]."""
    m, k = x.shape
    n = weight.shape[0]
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    _skinny_kernel[(triton.cdiv(n, BLOCK_N),)](
        x, weight, bias if bias is not None else weight, out, m, n, x.stride(0), weight.stride(0), out.stride(0),
        K=k, HAS_BIAS=bias is not None, EVEN_K=k % BLOCK_K == 0, BLOCK_M=MAX_ROWS, BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K, NUM_STAGES=NUM_STAGES, num_warps=NUM_WARPS)
    return out

"""Matrix-vector product for one-token steps: out[N] = W[N, K] @ x[K] (+ bias), in Triton, optionally with
the norm before it and the GELU after it in the same kernel.

With one row of input the product is a pure stream through the weights. Each program owns BLOCK_N output
rows and walks all of K in order (no split-K, so no second reduction kernel), keeping several tiles in
flight; products accumulate in float32 and round once.

A one-token step is launch-bound for small models (GPT-2 small: about a hundred kernels of 1-4 us each), so
`norm_gemv` also takes the residual add and the RMSNorm / LayerNorm that precede every block's first product:
each program computes the row's statistics itself (the row is a few KB, read from L2) and normalises each
tile as it loads it, rounding where the separate kernels round (the add, then the norm's output), which
saves a kernel per norm.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import dependent_launch
from .dependent_launch import wait_for_inputs

# From benchmarks/bench_gemv.py on an H200 (results in benchmarks/results): best over the Mistral-7B and
# GPT-2 shapes together, 11% and 40% less matrix-product time per decode step than cuBLAS.
BLOCK_N = 8
BLOCK_K = 256
NUM_WARPS = 4
NUM_STAGES = 4

_NO_NORM, _RMS, _LAYER = 0, 1, 2


@triton.jit
def _gelu_tanh(x):
    """GELU, tanh approximation (GPT-2's), in float32; tanh from one exp without overflow."""
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return 0.5 * x * (1.0 + tl.where(u < 0, -t, t))


@triton.jit
def _input_tile(x_ptr, r_ptr, nw_ptr, nb_ptr, offs, mask, mean, rstd, dtype: tl.constexpr, NORM: tl.constexpr,
                HAS_RESIDUAL: tl.constexpr):
    """A tile of the product's input in float32: x itself, or norm(x + residual) rounded as the norm kernel
    rounds (the add, then the norm's output in the model's dtype)."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if NORM != 0:
        if HAS_RESIDUAL:
            x = (x + tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)).to(dtype).to(tl.float32)
        nw = tl.load(nw_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if NORM == 1:  # normalise in float32, round, then scale by the weight (the reference Llama's order)
            x = nw * (x * rstd).to(dtype).to(tl.float32)
        else:
            x = (x - mean) * rstd * nw + tl.load(nb_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = x.to(dtype).to(tl.float32)
    return x


@triton.jit
def _gemv_kernel(x_ptr, r_ptr, sum_ptr, nw_ptr, nb_ptr, w_ptr, b_ptr, out_ptr, N, stride_wn, eps,
                 K: tl.constexpr, K_P: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr,
                 HAS_RESIDUAL: tl.constexpr, GELU: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 NUM_STAGES: tl.constexpr, DEPENDENT: tl.constexpr):
    dtype = out_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_wn
    wait_for_inputs(DEPENDENT)
    cols = tl.arange(0, BLOCK_K)
    mean = 0.0
    rstd = 1.0
    if NORM != 0:  # the input row's statistics, as the norm kernel computes them (djinn/kernels/fused.py)
        every = tl.arange(0, K_P)
        every_mask = every < K
        xr = tl.load(x_ptr + every, mask=every_mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            xr = (xr + tl.load(r_ptr + every, mask=every_mask, other=0.0).to(tl.float32)).to(dtype)
            if tl.program_id(0) == 0:
                tl.store(sum_ptr + every, xr, mask=every_mask)
            xr = xr.to(tl.float32)
        if NORM == 1:
            rstd = tl.rsqrt(tl.sum(xr * xr, axis=0) / K + eps)
        else:
            mean = tl.sum(xr, axis=0) / K
            centred = tl.where(every_mask, xr - mean, 0.0)
            rstd = tl.rsqrt(tl.sum(centred * centred, axis=0) / K + eps)
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        col_mask = k + cols < K
        w = tl.load(w_rows + (k + cols)[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        x = _input_tile(x_ptr, r_ptr, nw_ptr, nb_ptr, k + cols, col_mask, mean, rstd, dtype, NORM, HAS_RESIDUAL)
        acc += w.to(tl.float32) * x[None, :]
    out = tl.sum(acc, axis=1)
    if HAS_BIAS:
        out += tl.load(b_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    if GELU:  # on the product rounded to the model's dtype, as a separate activation would see it
        out = _gelu_tanh(out.to(dtype).to(tl.float32))
    tl.store(out_ptr + rows, out.to(dtype), mask=row_mask)


def _launch(x: torch.Tensor, residual: Optional[torch.Tensor], total: torch.Tensor, norm_weight: torch.Tensor,
            norm_bias: Optional[torch.Tensor], eps: float, norm_kind: int, weight: torch.Tensor,
            bias: Optional[torch.Tensor], gelu: bool) -> torch.Tensor:
    n, k = weight.shape
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, BLOCK_N),)](
        x, residual if residual is not None else x, total, norm_weight,
        norm_bias if norm_bias is not None else norm_weight, weight, bias if bias is not None else weight, out, n,
        weight.stride(0), eps, K=k, K_P=triton.next_power_of_2(k), HAS_BIAS=bias is not None, NORM=norm_kind,
        HAS_RESIDUAL=residual is not None, GELU=gelu, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, NUM_STAGES=NUM_STAGES,
        num_warps=NUM_WARPS, **dependent_launch.options())
    return out


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x: [1, K], weight: [N, K] with unit stride along K. Returns [1, N]."""
    x = x.contiguous()
    return _launch(x, None, x, weight, None, 0.0, _NO_NORM, weight, bias, gelu=False)


def norm_gemv(x: torch.Tensor, residual: Optional[torch.Tensor], norm_weight: torch.Tensor,
              norm_bias: Optional[torch.Tensor], eps: float, rms: bool, weight: torch.Tensor,
              bias: Optional[torch.Tensor], gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """For x: [1, K]: (x + residual, gemv(norm(x + residual))), with GELU (tanh) on the product when `gelu`;
    without a residual the first is x itself. The norm is RMSNorm (`rms`) or LayerNorm with `norm_bias`."""
    x = x.contiguous()
    if residual is not None:
        residual = residual.reshape(x.shape).contiguous()
    total = torch.empty_like(x) if residual is not None else x
    out = _launch(x, residual, total, norm_weight, norm_bias, eps, _RMS if rms else _LAYER, weight, bias, gelu)
    return total, out

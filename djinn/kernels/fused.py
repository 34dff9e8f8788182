"""Fused elementwise kernels for the GPU path: RMSNorm and LayerNorm (each with the residual add before it),
SwiGLU's silu(gate) * up, and rotary embedding fused with the KV-cache write. Each replaces several PyTorch
kernels with one; each computes in float32 and rounds once."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import dependent_launch
from .dependent_launch import wait_for_inputs


@triton.jit
def _norm_kernel(x_ptr, r_ptr, sum_ptr, w_ptr, b_ptr, out_ptr, stride_x, stride_r, stride_s, stride_o, n_cols, eps,
                 BLOCK: tl.constexpr, RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                 DEPENDENT: tl.constexpr):
    wait_for_inputs(DEPENDENT)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:  # the residual add, rounded as a separate add would be, then normalised from there
        x = (x + tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)).to(dtype)
        tl.store(sum_ptr + row * stride_s + cols, x, mask=mask)
        x = x.to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if RMS:
        normed = x * tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        # like the reference: normalise in float32, round to the input dtype, then scale by the weight
        out = w * normed.to(dtype).to(tl.float32)
    else:
        centred = tl.where(mask, x - tl.sum(x, axis=0) / n_cols, 0.0)
        out = centred * tl.rsqrt(tl.sum(centred * centred, axis=0) / n_cols + eps) * w
        if HAS_BIAS:
            out += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, out.to(dtype), mask=mask)


def norm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, bias: Optional[torch.Tensor],
         eps: float, rms: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm (`rms`) or LayerNorm of x + residual (of x alone when residual is None), in one kernel.
    Returns (x + residual, or x itself; the normalised rows). A fused add gives the same bits as the add
    followed by the norm."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    total = x2
    if residual is not None:
        residual = residual.reshape(x2.shape).contiguous()
        total = torch.empty_like(out)
    if x2.shape[0]:
        block = triton.next_power_of_2(x2.shape[1])
        r = residual if residual is not None else x2
        _norm_kernel[(x2.shape[0],)](x2, r, total, weight, bias if bias is not None else weight, out, x2.stride(0),
                                     r.stride(0), total.stride(0), out.stride(0), x2.shape[1], eps, BLOCK=block,
                                     RMS=rms, HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
                                     num_warps=min(16, max(1, block // 256)), **dependent_launch.options())
    return (total.view(x.shape) if residual is not None else x), out.view(x.shape)


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n_cols, BLOCK: tl.constexpr, DEPENDENT: tl.constexpr):
    wait_for_inputs(DEPENDENT)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    n, two_f = gate_up.shape
    f = two_f // 2
    out = torch.empty((n, f), dtype=gate_up.dtype, device=gate_up.device)
    if n:
        block = 1024
        _silu_mul_kernel[(n, triton.cdiv(f, block))](gate_up, out, gate_up.stride(0), out.stride(0), f, BLOCK=block,
                                                       num_warps=4, **dependent_launch.options())
    return out


@triton.jit
def rope_tables(cos_ptr, sin_ptr, pos, d, mask, R: tl.constexpr):
    """For rotate-half rotary embeddings of a head's first R lanes at `pos`: each lane's partner lane, the sign
    its partner enters with, and the position's cos and sin (float32); lanes from R on (partial rotary, as
    GPT-NeoX's) keep their value: partner themselves, cos 1, sin 0."""
    half: tl.constexpr = R // 2
    turns = d < R
    partner = tl.where(d < half, d + half, tl.where(turns, d - half, d))
    sign = tl.where(d < half, -1.0, 1.0)
    cos = tl.load(cos_ptr + pos * R + d, mask=mask & turns, other=1.0)
    sin = tl.load(sin_ptr + pos * R + d, mask=mask & turns, other=0.0)
    return partner, sign, cos, sin


@triton.jit
def write_kv(kv_ptr, blocks_ptr, offsets_ptr, tok, kv_head, k, v_src, d, mask, stride_blk, stride_kv, stride_tok,
             stride_head):
    """Token `tok`'s key `k` (values, already rotated) and value (read at `v_src`) into its cache slot."""
    dst = (tl.load(blocks_ptr + tok).to(tl.int64) * stride_blk + tl.load(offsets_ptr + tok).to(tl.int64) * stride_tok
           + kv_head * stride_head)
    tl.store(kv_ptr + dst + d, k.to(kv_ptr.dtype.element_ty), mask=mask)
    tl.store(kv_ptr + dst + stride_kv + d, tl.load(v_src + d, mask=mask, other=0.0), mask=mask)


@triton.jit
def rotate(x, x_partner, sign, cos, sin):
    """x rotated by position, in float32, from its values and its partner lanes' values."""
    return x.to(tl.float32) * cos + sign * x_partner.to(tl.float32) * sin


@triton.jit
def _rope_write_kernel(
    q_ptr, k_ptr, v_ptr, q_out_ptr, kv_ptr, blocks_ptr, offsets_ptr, pos_ptr, cos_ptr, sin_ptr,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_on, stride_oh,
    stride_blk, stride_kv, stride_tok, stride_head, n_heads,
    D: tl.constexpr, D_P: tl.constexpr, ROPE: tl.constexpr, R: tl.constexpr, DEPENDENT: tl.constexpr,
):
    wait_for_inputs(DEPENDENT)
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    d = tl.arange(0, D_P)
    mask = d < D
    if ROPE:
        partner, sign, cos, sin = rope_tables(cos_ptr, sin_ptr, tl.load(pos_ptr + tok).to(tl.int64), d, mask, R)
    if head < n_heads:
        if ROPE:
            src = q_ptr + tok * stride_qn + head * stride_qh
            x = rotate(tl.load(src + d, mask=mask, other=0.0), tl.load(src + partner, mask=mask, other=0.0), sign,
                       cos, sin)
            tl.store(q_out_ptr + tok * stride_on + head * stride_oh + d, x.to(q_out_ptr.dtype.element_ty), mask=mask)
    else:
        kh = head - n_heads
        k_src = k_ptr + tok * stride_kn + kh * stride_kh
        if ROPE:
            k = rotate(tl.load(k_src + d, mask=mask, other=0.0), tl.load(k_src + partner, mask=mask, other=0.0), sign,
                       cos, sin)
        else:
            k = tl.load(k_src + d, mask=mask, other=0.0)
        write_kv(kv_ptr, blocks_ptr, offsets_ptr, tok, kh, k, v_ptr + tok * stride_vn + kh * stride_vh, d, mask,
                 stride_blk, stride_kv, stride_tok, stride_head)


def rope_and_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor,
                      write_blocks: torch.Tensor, write_offsets: torch.Tensor, positions: torch.Tensor,
                      rope: Optional[object]) -> torch.Tensor:
    """Rotate q and k by position (when `rope` holds the model's cos/sin tables, over each head's first
    `rope.dim` lanes), write k and v into the cache slots, and return the rotated q (q itself without rope)."""
    n, n_heads, d_head = q.shape
    n_kv = k.shape[1]
    if n == 0:
        return q
    q_out = torch.empty((n, n_heads, d_head), dtype=q.dtype, device=q.device) if rope is not None else q
    cos = rope.cos if rope is not None else q  # unused without rope
    sin = rope.sin if rope is not None else q
    _rope_write_kernel[(n, n_heads + n_kv)](
        q, k, v, q_out, kv_layer, write_blocks, write_offsets, positions, cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), q_out.stride(0),
        q_out.stride(1), kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3), n_heads,
        D=d_head, D_P=triton.next_power_of_2(d_head), ROPE=rope is not None,
        R=rope.dim if rope is not None else d_head, num_warps=1,
        **dependent_launch.options(),
    )
    return q_out

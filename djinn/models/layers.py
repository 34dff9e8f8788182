"""Small building blocks shared by the families: Linear, RMSNorm, LayerNorm, rotary embeddings, SwiGLU."""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


# A detailed forward hands each detail site's value to `hook(local name, value)` and goes on with what it
# returns (the value, edited or replaced): the engine's edits, captures and pauses at that site.
Hook = Callable[[str, torch.Tensor], torch.Tensor]


class Linear(nn.Linear):
    """nn.Linear whose few-row products on the GPU (decode steps) run as Triton kernels where they stream the
    weights faster than cuBLAS: a GEMV for one row; up to 64 rows, a 64-row tile for outputs whose rows are
    not 16-byte aligned (GPT-2's 50257-token head), which push cuBLAS off its fast kernels (0.7 against 3.0
    TB/s at 64 rows, benchmarks/results/bench_skinny_matmul_h200.txt; on aligned shapes the tile is within a
    few percent of cuBLAS at best, and slower with any one setting)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dim() == 2:
            from ..kernels import gemv, skinny_matmul

            if x.shape[0] == 1:
                return gemv.gemv(x, self.weight, self.bias)
            if x.shape[0] <= skinny_matmul.MAX_ROWS and (self.out_features * x.element_size()) % 16:
                return skinny_matmul.skinny_matmul(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """A product computed in parts, made whole: itself here; summed over the ranks where tensor
        parallelism splits the product's inputs (djinn/parallel/shard.py)."""
        return x


class _Norm(nn.Module):
    """A norm that can also take the residual add before it: add_and_norm(resid, branch) returns
    (resid + branch, norm(resid + branch)), in one kernel on the GPU (branch None: nothing to add)."""

    rms: bool

    def __init__(self, dim: int, eps: float, bias: bool, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        self.eps, self.offset = eps, offset
        self._gain: Optional[torch.Tensor] = None

    def gain(self) -> torch.Tensor:
        """What the normalised value is scaled by: the weight, or (offset + weight) in float32 (Gemma's norms),
        computed once where the weights came to rest (a plain attribute: casting the model must not round it)."""
        if not self.offset:
            return self.weight
        if self._gain is None or self._gain.device != self.weight.device:
            self._gain = self.weight.float() + self.offset
        return self._gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from ..kernels.fused import norm

            shape = x.shape
            return norm(x.reshape(-1, shape[-1]), None, self.gain(), self.bias, self.eps, self.rms)[1].view(shape)
        return self.reference(x)

    def add_and_norm(self, resid: torch.Tensor, branch: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if branch is None:
            return resid, self(resid)
        if resid.is_cuda:
            from ..kernels.fused import norm

            return norm(resid, branch, self.gain(), self.bias, self.eps, self.rms)
        resid = resid + branch
        return resid, self.reference(resid)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def detailed(self, x: torch.Tensor, hook: Hook, name: str) -> torch.Tensor:
        """The norm with its values at `{name}.hook_scale` (sqrt(var + eps), the RMS for RMSNorm) and
        `{name}.hook_normalized` (the input, centred for LayerNorm, over that scale): float32, as TransformerLens
        4.x names them; the weight and bias come after."""
        h = x.float()
        if not self.rms:
            h = h - h.mean(-1, keepdim=True)
        scale = hook(f"{name}.hook_scale", (h.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        normalized = hook(f"{name}.hook_normalized", h / scale)
        if self.rms:
            return self._scaled(normalized, x.dtype)
        return (normalized * self.weight.float() + self.bias.float()).to(x.dtype)


class RMSNorm(_Norm):
    rms = True

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__(dim, eps, bias=False, offset=offset)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        return self._scaled(h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps), x.dtype)

    def _scaled(self, normalized: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # Llama rounds to the input dtype and then scales; Gemma scales by (1 + weight) in float32, then rounds
        if self.offset:
            return (normalized * self.gain()).to(dtype)
        return self.weight * normalized.to(dtype)


class LayerNorm(_Norm):
    rms = False

    def __init__(self, dim: int, eps: float):
        super().__init__(dim, eps, bias=True)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)


FUSED_NORM_MAX_WIDTH = 1024


def add_and_norm(norm: Optional[_Norm], resid: torch.Tensor, pending: Optional[torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(resid + pending, its norm); without a norm (OLMo 2 has none before its halves) the sum itself."""
    if norm is None:
        resid = resid if pending is None else resid + pending
        return resid, resid
    return norm.add_and_norm(resid, pending)


def normed_linear(norm: Optional[_Norm], linear: Linear, resid: torch.Tensor, pending: Optional[torch.Tensor],
                  gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(resid + pending, linear(norm(resid + pending))), with GELU (tanh) on the product when `gelu`: a block's
    norm and first product. A one-token step on the GPU runs them, and the add, in one kernel where its row is
    narrow: on an H200 (benchmarks/results/bench_gemv_fused_h200.txt) that saved a little at GPT-2's 768
    (4.47 -> 4.39 us for ln1 + qkv) and cost at Mistral's 4096 (ln2 + gate_up 64.8 -> 67.2 us), where every
    program's statistics and per-tile normalising outweigh the norm kernel."""
    if norm is not None and resid.is_cuda and resid.dim() == 2 and resid.shape[0] == 1 and \
            resid.shape[1] <= FUSED_NORM_MAX_WIDTH:
        from ..kernels.gemv import norm_gemv

        return norm_gemv(resid, pending, norm.gain(), norm.bias, norm.eps, norm.rms, linear.weight, linear.bias,
                         gelu)
    resid, x = add_and_norm(norm, resid, pending)
    out = linear(x)
    return resid, F.gelu(out, approximate="tanh") if gelu else out


def rope_inv_freq(dim: int, theta: float, scaling: Optional[dict[str, Any]]) -> torch.Tensor:
    """Inverse frequencies for rotary embeddings over `dim` dims, with Llama-3 or linear scaling (longrope's
    factors are applied per position, in Rotary)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind = (scaling or {}).get("rope_type", "default")
    if kind in ("default", "longrope"):
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope scaling {kind!r}")


def _position_freqs(max_seq_len: int, inv_freq: torch.Tensor, scaling: Optional[dict[str, Any]]
                    ) -> tuple[torch.Tensor, float]:
    """Each position's angles [max_seq_len, dim / 2] and the factor on cos and sin. Longrope (Phi-3) divides
    the frequencies by its short factors below the original context and by its long ones from there on; its
    attention factor scales cos and sin."""
    positions = torch.arange(max_seq_len, dtype=torch.float32)[:, None]
    if (scaling or {}).get("rope_type") != "longrope":
        return positions * inv_freq[None, :], 1.0
    original = int(scaling["original_max_position_embeddings"])
    short = torch.tensor(scaling["short_factor"], dtype=torch.float32)
    long = torch.tensor(scaling["long_factor"], dtype=torch.float32)
    factors = torch.where(positions >= original, long[None, :], short[None, :])
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        factor = float(scaling.get("factor") or max_seq_len / original)
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return positions * inv_freq[None, :] / factors, float(attention_factor)


class Rotary(nn.Module):
    """cos/sin tables for every position up to the context length (rotate-half layout), over each head's
    first `dim` dims (GPT-NeoX rotates only part of a head)."""

    def __init__(self, dim: int, max_seq_len: int, theta: float, scaling: Optional[dict[str, Any]]):
        super().__init__()
        self.dim = dim
        freqs, factor = _position_freqs(max_seq_len, rope_inv_freq(dim, theta, scaling), scaling)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos() * factor, persistent=False)
        self.register_buffer("sin", emb.sin() * factor, persistent=False)

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate x: [N, heads, d_head] by each token's position."""
        cos, sin = self.cos[positions].to(x.dtype)[:, None, :], self.sin[positions].to(x.dtype)[:, None, :]
        r, half = self.dim, self.dim // 2
        turned = x[..., :r]
        rotated = torch.cat([-turned[..., half:], turned[..., :half]], dim=-1)
        turned = turned * cos + rotated * sin
        return turned if r == x.shape[-1] else torch.cat([turned, x[..., r:]], dim=-1)


def gated_act(gate_up: torch.Tensor, act: str) -> torch.Tensor:
    """act(gate) * up, with gate and up side by side in the last dimension (SwiGLU, GeGLU)."""
    if act == "silu":
        return silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return activation(gate, act) * up


def activation(x: torch.Tensor, act: str) -> torch.Tensor:
    if act == "silu":
        return F.silu(x)
    return F.gelu(x, approximate="tanh" if act == "gelu_tanh" else "none")


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's silu(gate) * up, with gate and up side by side in the last dimension."""
    if gate_up.is_cuda:
        from ..kernels.fused import silu_mul as fused

        return fused(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def per_head_results(proj: Linear, z: torch.Tensor, hook: Hook) -> torch.Tensor:
    """The output projection as the sum of each head's result ([T, n_heads, d_model]), plus the bias."""
    n_heads, d_head = z.shape[1], z.shape[2]
    w = proj.weight.view(proj.out_features, n_heads, d_head)
    result = hook("attn.hook_result", torch.einsum("thd,mhd->thm", z, w))
    out = result.sum(1)
    return proj.reduce(out if proj.bias is None else out + proj.bias)


# ---------------------------------------------------------------- weights by TransformerLens names
# Views of the weights in TransformerLens's layout ([d_in, d_out] products, heads split out), nothing copied.

def tl_linear(w: str, b: str, linear: nn.Linear, rows: slice = slice(None)) -> dict[str, torch.Tensor]:
    """A product (rows `rows` of a fused one) as `w` [d_in, d_out] and, if it has one, bias `b` [d_out]."""
    out = {w: linear.weight[rows].T}
    if linear.bias is not None:
        out[b] = linear.bias[rows]
    return out


def tl_heads_in(w: str, b: str, linear: nn.Linear, rows: slice, n_heads: int, d_head: int) -> dict[str, torch.Tensor]:
    """Per-head input products: `w` [n_heads, d_model, d_head] and bias `b` [n_heads, d_head]."""
    out = {w: linear.weight[rows].view(n_heads, d_head, -1).transpose(1, 2)}
    if linear.bias is not None:
        out[b] = linear.bias[rows].view(n_heads, d_head)
    return out


def tl_heads_out(linear: nn.Linear, n_heads: int, d_head: int) -> dict[str, torch.Tensor]:
    """The attention's output product: W_O [n_heads, d_head, d_model] and b_O [d_model]."""
    out = {"W_O": linear.weight.T.reshape(n_heads, d_head, -1)}
    if linear.bias is not None:
        out["b_O"] = linear.bias
    return out


def tl_norm(name: str, norm: _Norm) -> dict[str, torch.Tensor]:
    out = {f"{name}.w": norm.gain()}
    if norm.bias is not None:
        out[f"{name}.b"] = norm.bias
    return out


def prefixed(prefix: str, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in weights.items()}

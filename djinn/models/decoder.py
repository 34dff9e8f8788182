"""The Llama family: Llama 2 and 3, Mistral (sliding window), Qwen2 (qkv bias). GQA, tied or untied head.

Each block is split into the halves the engine runs between hook sites:
    z        = attention(norm(resid))            -> blocks.i.attn.hook_z
    attn_out = o_proj(z)                         -> blocks.i.hook_attn_out
    resid    = resid + attn_out                  -> blocks.i.hook_resid_mid
    mlp_out  = mlp(norm(resid))                  -> blocks.i.hook_mlp_out
    resid    = resid + mlp_out                   -> blocks.i.hook_resid_post
Where no hook reads a residual add, the engine hands it to the next norm, which adds and normalises in one
kernel (`pending` below).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import sites
from .attention import RowKV, detailed_attention, paged_attention
from .config import ModelConfig
from .context import ForwardContext
from .gpt2 import per_head_results
from .layers import (Hook, Linear, RMSNorm, Rotary, normed_linear, prefixed, silu_mul, tl_heads_in, tl_heads_out,
                     tl_linear, tl_norm)

# The values inside each op that the detailed path (the `*_detailed` methods) shows; the embedding is the
# residual stream's start, so `hook_embed` is `blocks.0.hook_resid_pre`
DETAIL_SITES = {"attn_z": sites.ATTENTION, "attn_out": sites.PROJECTION, "mlp_out": sites.MLP, "final_norm": sites.FINAL}


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv_heads, self.d_head = layer, cfg.n_heads, cfg.n_kv_heads, cfg.d_head
        # q, k and v in one matrix product (rows: q heads, then k heads, then v heads)
        self.qkv_proj = Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.d_head, bias=cfg.qkv_bias)
        self.o_proj = Linear(cfg.n_heads * cfg.d_head, cfg.d_model, bias=cfg.o_bias)

    def forward(self, qkv: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """z from the fused projections `qkv` (self.qkv_proj of the normalised residual)."""
        h, kv, dh = self.n_heads, self.n_kv_heads, self.d_head
        q, k, v = qkv.view(qkv.shape[0], h + 2 * kv, dh).split([h, kv, kv], dim=1)
        return paged_attention(q, k, v, ctx.kv[:, self.layer], ctx.attention, dh**-0.5, rope=ctx.rope,
                               layer=self.layer)

    def detailed(self, qkv: torch.Tensor, kv: torch.Tensor, row: RowKV, hook: Hook) -> torch.Tensor:
        h, n_kv, dh = self.n_heads, self.n_kv_heads, self.d_head
        q, k, v = qkv.view(qkv.shape[0], h + 2 * n_kv, dh).split([h, n_kv, n_kv], dim=1)
        return detailed_attention(q, k, v, kv[:, self.layer], row, dh**-0.5, hook)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = Linear(cfg.d_model, 2 * cfg.d_mlp, bias=cfg.mlp_bias)  # gate rows, then up rows
        self.down_proj = Linear(cfg.d_mlp, cfg.d_model, bias=cfg.mlp_bias)

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        """The MLP's output from gate_up_proj of the normalised residual."""
        return self.down_proj(silu_mul(gate_up))


class LlamaBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.ln1 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = LlamaAttention(cfg, layer)
        self.ln2 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = LlamaMLP(cfg)

    def attn_z(self, resid: torch.Tensor, ctx: ForwardContext,
               pending: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(resid + pending, z): a residual add still pending is done together with the norm."""
        resid, qkv = normed_linear(self.ln1, self.attn.qkv_proj, resid, pending)
        return resid, self.attn(qkv, ctx)

    def attn_out(self, z: torch.Tensor) -> torch.Tensor:
        return self.attn.o_proj(z.flatten(1))

    def mlp_out(self, resid: torch.Tensor,
                pending: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        resid, gate_up = normed_linear(self.ln2, self.mlp.gate_up_proj, resid, pending)
        return resid, self.mlp(gate_up)

    # the same ops spelled out, for rows that read or edit the values inside them

    def attn_z_detailed(self, resid: torch.Tensor, kv: torch.Tensor, row: RowKV, hook: Hook) -> torch.Tensor:
        return self.attn.detailed(self.attn.qkv_proj(self.ln1.detailed(resid, hook, "ln1")), kv, row, hook)

    def attn_out_detailed(self, z: torch.Tensor, hook: Hook) -> torch.Tensor:
        return per_head_results(self.attn.o_proj, z, hook)

    def mlp_out_detailed(self, resid: torch.Tensor, hook: Hook) -> torch.Tensor:
        gate, up = self.mlp.gate_up_proj(self.ln2.detailed(resid, hook, "ln2")).chunk(2, dim=-1)
        pre, pre_linear = hook("mlp.hook_pre", gate), hook("mlp.hook_pre_linear", up)
        return self.mlp.down_proj(hook("mlp.hook_post", F.silu(pre) * pre_linear))


class LlamaModel(nn.Module):
    detail_sites = DETAIL_SITES

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(LlamaBlock(cfg, i) for i in range(cfg.n_layers))
        self.ln_final = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.rotary = Rotary(cfg.d_head, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)

    def prepare(self, ctx: ForwardContext) -> None:
        ctx.rope = self.rotary

    def embed_tokens(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.embed(tokens)

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(x)

    def weights(self) -> dict[str, torch.Tensor]:
        """Every weight by its TransformerLens name and in its layout (views)."""
        c = self.cfg
        q, kv = c.n_heads * c.d_head, c.n_kv_heads * c.d_head
        out = {"W_E": self.embed.weight}
        for i, b in enumerate(self.blocks):
            qkv, gate_up = b.attn.qkv_proj, b.mlp.gate_up_proj
            out.update(prefixed(f"blocks.{i}", {
                **tl_norm("ln1", b.ln1),
                **prefixed("attn", {**tl_heads_in("W_Q", "b_Q", qkv, slice(0, q), c.n_heads, c.d_head),
                                    **tl_heads_in("W_K", "b_K", qkv, slice(q, q + kv), c.n_kv_heads, c.d_head),
                                    **tl_heads_in("W_V", "b_V", qkv, slice(q + kv, q + 2 * kv), c.n_kv_heads, c.d_head),
                                    **tl_heads_out(b.attn.o_proj, c.n_heads, c.d_head)}),
                **tl_norm("ln2", b.ln2),
                **prefixed("mlp", {**tl_linear("W_gate", "b_gate", gate_up, slice(0, c.d_mlp)),
                                   **tl_linear("W_in", "b_in", gate_up, slice(c.d_mlp, 2 * c.d_mlp)),
                                   **tl_linear("W_out", "b_out", b.mlp.down_proj)})}))
        return {**out, **tl_norm("ln_final", self.ln_final), **tl_linear("W_U", "b_U", self.lm_head)}

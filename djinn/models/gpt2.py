"""GPT-2: learned positions, LayerNorm, fused qkv, tied head (unless the config unties it), GELU (tanh
approximation).

Blocks expose the same halves as the decoder (decoder.py), so the engine treats both alike.
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
from .layers import Hook, LayerNorm, Linear, normed_linear, per_head_results, prefixed, tl_heads_in, tl_heads_out, tl_linear, tl_norm

# The values inside each op that the detailed path (the `*_detailed` methods) shows, in the order it computes them
DETAIL_SITES = {"embed": sites.EMBEDDING, "attn_z": tuple(n for n in sites.ATTENTION if "rot_" not in n),
                "attn_out": sites.PROJECTION, "mlp_out": tuple(n for n in sites.MLP if n != "mlp.hook_pre_linear"),
                "final_norm": sites.FINAL}


class GPT2Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.d_head = layer, cfg.n_heads, cfg.d_head
        self.qkv = Linear(cfg.d_model, 3 * cfg.n_heads * cfg.d_head)
        self.proj = Linear(cfg.n_heads * cfg.d_head, cfg.d_model)

    def forward(self, qkv: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """z from the fused projections `qkv` (self.qkv of the normalised residual)."""
        q, k, v = qkv.view(qkv.shape[0], 3 * self.n_heads, self.d_head).split(self.n_heads, dim=1)
        return paged_attention(q, k, v, ctx.kv[:, self.layer], ctx.attention, self.d_head**-0.5, layer=self.layer)

    def detailed(self, qkv: torch.Tensor, kv: torch.Tensor, row: RowKV, hook: Hook) -> torch.Tensor:
        q, k, v = qkv.view(qkv.shape[0], 3 * self.n_heads, self.d_head).split(self.n_heads, dim=1)
        return detailed_attention(q, k, v, kv[:, self.layer], row, self.d_head**-0.5, hook)


class GPT2MLP(nn.Module):
    """proj(gelu(fc(x))); the block runs fc and the GELU together with the norm before them."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = Linear(cfg.d_model, cfg.d_mlp)
        self.proj = Linear(cfg.d_mlp, cfg.d_model)


class GPT2Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.ln1 = LayerNorm(cfg.d_model, cfg.norm_eps)
        self.attn = GPT2Attention(cfg, layer)
        self.ln2 = LayerNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = GPT2MLP(cfg)

    def attn_z(self, resid: torch.Tensor, ctx: ForwardContext,
               pending: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(resid + pending, z): a residual add still pending is done together with the norm."""
        resid, qkv = normed_linear(self.ln1, self.attn.qkv, resid, pending)
        return resid, self.attn(qkv, ctx)

    def attn_out(self, z: torch.Tensor) -> torch.Tensor:
        return self.attn.proj(z.flatten(1))

    def mlp_out(self, resid: torch.Tensor,
                pending: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        resid, hidden = normed_linear(self.ln2, self.mlp.fc, resid, pending, gelu=True)
        return resid, self.mlp.proj(hidden)

    # the same ops spelled out, for rows that read or edit the values inside them

    def attn_z_detailed(self, resid: torch.Tensor, kv: torch.Tensor, row: RowKV, hook: Hook) -> torch.Tensor:
        return self.attn.detailed(self.attn.qkv(self.ln1.detailed(resid, hook, "ln1")), kv, row, hook)

    def attn_out_detailed(self, z: torch.Tensor, hook: Hook) -> torch.Tensor:
        return per_head_results(self.attn.proj, z, hook)

    def mlp_out_detailed(self, resid: torch.Tensor, hook: Hook) -> torch.Tensor:
        pre = hook("mlp.hook_pre", self.mlp.fc(self.ln2.detailed(resid, hook, "ln2")))
        return self.mlp.proj(hook("mlp.hook_post", F.gelu(pre, approximate="tanh")))


class GPT2Model(nn.Module):
    detail_sites = DETAIL_SITES

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(GPT2Block(cfg, i) for i in range(cfg.n_layers))
        self.ln_final = LayerNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def prepare(self, ctx: ForwardContext) -> None:
        pass

    def rope_for(self, layer: int) -> None:
        return None

    def embed_tokens(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if tokens.is_cuda:  # both lookups and the add in one kernel, the same bits
            from ..kernels.embed import embed

            return embed(self.embed.weight, tokens, self.pos_embed.weight, positions)
        return self.embed(tokens) + self.pos_embed(positions)

    def embed_detailed(self, tokens: torch.Tensor, positions: torch.Tensor, hook: Hook) -> torch.Tensor:
        return hook("hook_embed", self.embed(tokens)) + hook("hook_pos_embed", self.pos_embed(positions))

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(x)

    def weights(self) -> dict[str, torch.Tensor]:
        """Every weight by its TransformerLens name and in its layout (views)."""
        h, dh = self.cfg.n_heads, self.cfg.d_head
        out = {"W_E": self.embed.weight, "W_pos": self.pos_embed.weight}
        for i, b in enumerate(self.blocks):
            qkv = b.attn.qkv
            out.update(prefixed(f"blocks.{i}", {
                **tl_norm("ln1", b.ln1),
                **prefixed("attn", {**tl_heads_in("W_Q", "b_Q", qkv, slice(0, h * dh), h, dh),
                                    **tl_heads_in("W_K", "b_K", qkv, slice(h * dh, 2 * h * dh), h, dh),
                                    **tl_heads_in("W_V", "b_V", qkv, slice(2 * h * dh, 3 * h * dh), h, dh),
                                    **tl_heads_out(b.attn.proj, h, dh)}),
                **tl_norm("ln2", b.ln2),
                **prefixed("mlp", {**tl_linear("W_in", "b_in", b.mlp.fc), **tl_linear("W_out", "b_out", b.mlp.proj)})}))
        return {**out, **tl_norm("ln_final", self.ln_final), **tl_linear("W_U", "b_U", self.lm_head)}

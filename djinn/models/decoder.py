"""The pre-norm rotary decoder that most families share: Llama 2/3, Mistral, Qwen2 and Qwen3, Gemma 2 and 3,
Phi-3, OLMo 2, Mixtral and GPT-NeoX (Pythia). Where they differ, the difference is a named choice of the
config (models/config.py): norms before and after each half, q/k norms, soft-caps, a window per layer,
partial rotary, a parallel residual, a mixture of experts for the MLP.

Each block is split into the halves the engine runs between hook sites:
    z        = attention(ln1(resid))             -> blocks.i.attn.hook_z
    attn_out = ln1_post(o_proj(z))               -> blocks.i.hook_attn_out
    resid    = resid + attn_out                  -> blocks.i.hook_resid_mid
    mlp_out  = ln2_post(mlp(ln2(resid)))         -> blocks.i.hook_mlp_out
    resid    = resid + mlp_out                   -> blocks.i.hook_resid_post
(ln1 / ln2 where the family has pre-norms, ln*_post where it has post-norms.) A parallel block's MLP reads
the block's input: its attention output joins the residual together with the MLP's, and it has no
resid_mid. Where no hook reads a residual add, the engine hands it to the next norm, which adds and
normalises in one kernel (`pending` below).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .. import sites
from .attention import RowKV, detailed_attention, paged_attention
from .config import ModelConfig
from .context import ForwardContext
from .experts import Experts
from .layers import (Hook, LayerNorm, Linear, RMSNorm, Rotary, activation, add_and_norm, gated_act, normed_linear,
                     per_head_results, prefixed, tl_heads_in, tl_heads_out, tl_linear, tl_norm)


def make_norm(cfg: ModelConfig, dim: int):
    return LayerNorm(dim, cfg.norm_eps) if cfg.norm == "layer" else RMSNorm(dim, cfg.norm_eps, cfg.norm_offset)


def detail_sites(cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
    """The values inside each op that the detailed path (the `*_detailed` methods) shows, in the order it
    computes them. The embedding is the residual stream's start, so `hook_embed` is `blocks.0.hook_resid_pre`."""
    def norm(name: str, present: bool) -> tuple[str, ...]:
        return (f"{name}.hook_scale", f"{name}.hook_normalized") if present else ()

    attention = tuple(s for s in sites.ATTENTION if not s.startswith("ln1."))
    if cfg.n_experts:
        neurons = ("hook_pre", "hook_pre_linear", "hook_post")
        mlp = ("mlp.hook_router_logits", "mlp.hook_expert_weights") + tuple(
            f"mlp.experts.{j}.{name}" for j in range(cfg.n_experts) for name in neurons)
    else:
        mlp = tuple(s for s in sites.MLP if s.startswith("mlp.") and (cfg.gated_mlp or s != "mlp.hook_pre_linear"))
    return {"attn_z": norm("ln1", cfg.pre_norms) + attention,
            "attn_out": sites.PROJECTION + norm("ln1_post", cfg.post_norms),
            "mlp_out": norm("ln2", cfg.pre_norms) + mlp + norm("ln2_post", cfg.post_norms),
            "final_norm": sites.FINAL}


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv_heads, self.d_head = layer, cfg.n_heads, cfg.n_kv_heads, cfg.d_head
        self.window, self.softcap = cfg.window(layer), cfg.attn_softcap
        self.scale = cfg.attn_scale or cfg.d_head ** -0.5
        self.local_rope = bool(self.window) and cfg.rope_local_theta is not None
        # q, k and v in one matrix product (rows: q heads, then k heads, then v heads)
        self.qkv_proj = Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.d_head, bias=cfg.qkv_bias)
        self.o_proj = Linear(cfg.n_heads * cfg.d_head, cfg.d_model, bias=cfg.o_bias)
        self.q_norm = self.k_norm = None
        if cfg.qk_norm is not None:  # per head: one gain of d_head for all heads; "all": over the heads together
            per_head = cfg.qk_norm == "head"
            self.q_norm = make_norm(cfg, cfg.d_head if per_head else cfg.n_heads * cfg.d_head)
            self.k_norm = make_norm(cfg, cfg.d_head if per_head else cfg.n_kv_heads * cfg.d_head)

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h, kv, dh = self.n_heads, self.n_kv_heads, self.d_head
        return qkv.view(qkv.shape[0], h + 2 * kv, dh).split([h, kv, kv], dim=1)

    def qk_normed(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.q_norm is None:
            return q, k
        if self.q_norm.weight.shape[0] == self.d_head:
            return self.q_norm(q), self.k_norm(k)
        return self.q_norm(q.flatten(1)).view(q.shape), self.k_norm(k.flatten(1)).view(k.shape)

    def forward(self, qkv: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """z from the fused projections `qkv` (self.qkv_proj of the normalised residual)."""
        q, k, v = self.split(qkv)
        q, k = self.qk_normed(q, k)
        return paged_attention(q, k, v, ctx.kv[:, self.layer], ctx.attention, self.scale,
                               rope=ctx.rope_local if self.local_rope else ctx.rope, layer=self.layer,
                               window=self.window, softcap=self.softcap)

    def detailed(self, qkv: torch.Tensor, kv: torch.Tensor, row: RowKV, hook: Hook) -> torch.Tensor:
        q, k, v = self.split(qkv)
        return detailed_attention(q, k, v, kv[:, self.layer], row, self.scale, hook, self.softcap,
                                  qk_norm=self.qk_normed if self.q_norm is not None else None)


class MLP(nn.Module):
    """down(act(gate) * up) for gated MLPs (gate and up rows in one product, in_proj), down(act(in_proj)) for
    plain ones."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.act, self.gated = cfg.mlp_act, cfg.gated_mlp
        self.in_proj = Linear(cfg.d_model, (2 if cfg.gated_mlp else 1) * cfg.d_mlp, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.d_mlp, cfg.d_model, bias=cfg.mlp_bias)

    def after_in(self, h: torch.Tensor) -> torch.Tensor:
        """The MLP's output from in_proj of its input."""
        return self.down_proj(gated_act(h, self.act) if self.gated else activation(h, self.act))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.after_in(self.in_proj(x))

    def detailed(self, x: torch.Tensor, hook: Hook) -> torch.Tensor:
        h = self.in_proj(x)
        if not self.gated:
            pre = hook("mlp.hook_pre", h)
            return self.down_proj(hook("mlp.hook_post", activation(pre, self.act)))
        gate, up = h.chunk(2, dim=-1)
        pre, pre_linear = hook("mlp.hook_pre", gate), hook("mlp.hook_pre_linear", up)
        return self.down_proj(hook("mlp.hook_post", activation(pre, self.act) * pre_linear))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.parallel = cfg.parallel_residual
        self.ln1 = make_norm(cfg, cfg.d_model) if cfg.pre_norms else None
        self.attn = Attention(cfg, layer)
        self.ln1_post = make_norm(cfg, cfg.d_model) if cfg.post_norms else None
        self.ln2 = make_norm(cfg, cfg.d_model) if cfg.pre_norms else None
        self.mlp = Experts(cfg) if cfg.n_experts else MLP(cfg)
        self.ln2_post = make_norm(cfg, cfg.d_model) if cfg.post_norms else None

    def attn_z(self, resid: torch.Tensor, ctx: ForwardContext,
               pending: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(resid + pending, z): a residual add still pending is done together with the norm."""
        resid, qkv = normed_linear(self.ln1, self.attn.qkv_proj, resid, pending)
        return resid, self.attn(qkv, ctx)

    def attn_out(self, z: torch.Tensor) -> torch.Tensor:
        out = self.attn.o_proj(z.flatten(1))
        return out if self.ln1_post is None else self.ln1_post(out)

    def mlp_out(self, resid: torch.Tensor,
                pending: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.parallel:  # the MLP reads the block's input; the attention's output (pending) joins here
            out = self.mlp(resid if self.ln2 is None else self.ln2(resid))
            resid = resid + pending
        elif isinstance(self.mlp, MLP):
            resid, h = normed_linear(self.ln2, self.mlp.in_proj, resid, pending)
            out = self.mlp.after_in(h)
        else:
            resid, x = add_and_norm(self.ln2, resid, pending)
            out = self.mlp(x)
        return resid, out if self.ln2_post is None else self.ln2_post(out)

    # the same ops spelled out, for rows that read or edit the values inside them

    def attn_z_detailed(self, resid: torch.Tensor, kv: torch.Tensor, row: RowKV, hook: Hook) -> torch.Tensor:
        x = resid if self.ln1 is None else self.ln1.detailed(resid, hook, "ln1")
        return self.attn.detailed(self.attn.qkv_proj(x), kv, row, hook)

    def attn_out_detailed(self, z: torch.Tensor, hook: Hook) -> torch.Tensor:
        out = per_head_results(self.attn.o_proj, z, hook)
        return out if self.ln1_post is None else self.ln1_post.detailed(out, hook, "ln1_post")

    def mlp_out_detailed(self, resid: torch.Tensor, hook: Hook) -> torch.Tensor:
        """`resid`: the MLP's input stream (a parallel block's input, else the residual after attention)."""
        out = self.mlp.detailed(resid if self.ln2 is None else self.ln2.detailed(resid, hook, "ln2"), hook)
        return out if self.ln2_post is None else self.ln2_post.detailed(out, hook, "ln2_post")


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.detail_sites = detail_sites(cfg)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.ln_final = make_norm(cfg, cfg.d_model)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.build_rotary()

    def build_rotary(self, device: Optional[torch.device] = None) -> None:
        """The rope tables (not in the state dict: rebuilt where the model is materialised)."""
        c = self.cfg
        self.rotary = Rotary(c.rotary_dim, c.max_seq_len, c.rope_theta, c.rope_scaling).to(device)
        self.rotary_local = None if c.rope_local_theta is None else \
            Rotary(c.rotary_dim, c.max_seq_len, c.rope_local_theta, None).to(device)

    def rope_for(self, layer: int) -> Rotary:
        return self.rotary_local if self.blocks[layer].attn.local_rope else self.rotary

    def prepare(self, ctx: ForwardContext) -> None:
        ctx.rope, ctx.rope_local = self.rotary, self.rotary_local

    def embed_tokens(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        if self.cfg.embed_scale:  # Gemma: sqrt(d_model), rounded to the model's dtype first
            x = x * torch.tensor(self.cfg.d_model ** 0.5, dtype=x.dtype)
        return x

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(x)
        cap = self.cfg.final_softcap
        return logits if not cap else torch.tanh(logits / cap) * cap

    def weights(self) -> dict[str, torch.Tensor]:
        """Every weight by its TransformerLens name and in its layout (views; Gemma's norm gains are
        1 + weight, as TransformerLens holds them)."""
        c = self.cfg
        q, kv = c.n_heads * c.d_head, c.n_kv_heads * c.d_head
        out = {"W_E": self.embed.weight}
        for i, b in enumerate(self.blocks):
            qkv, attn = b.attn.qkv_proj, b.attn
            heads = {**tl_heads_in("W_Q", "b_Q", qkv, slice(0, q), c.n_heads, c.d_head),
                     **tl_heads_in("W_K", "b_K", qkv, slice(q, q + kv), c.n_kv_heads, c.d_head),
                     **tl_heads_in("W_V", "b_V", qkv, slice(q + kv, q + 2 * kv), c.n_kv_heads, c.d_head),
                     **tl_heads_out(attn.o_proj, c.n_heads, c.d_head)}
            if attn.q_norm is not None:
                heads.update({**tl_norm("q_norm", attn.q_norm), **tl_norm("k_norm", attn.k_norm)})
            norms = {}
            for name in ("ln1", "ln1_post", "ln2", "ln2_post"):
                if getattr(b, name) is not None:
                    norms.update(tl_norm(name, getattr(b, name)))
            out.update(prefixed(f"blocks.{i}", {**norms, **prefixed("attn", heads),
                                                **prefixed("mlp", self._mlp_weights(b.mlp))}))
        return {**out, **tl_norm("ln_final", self.ln_final), **tl_linear("W_U", "b_U", self.lm_head)}

    def _mlp_weights(self, mlp) -> dict[str, torch.Tensor]:
        if isinstance(mlp, Experts):
            return mlp.weights()
        d = self.cfg.d_mlp
        if not mlp.gated:
            return {**tl_linear("W_in", "b_in", mlp.in_proj), **tl_linear("W_out", "b_out", mlp.down_proj)}
        return {**tl_linear("W_gate", "b_gate", mlp.in_proj, slice(0, d)),
                **tl_linear("W_in", "b_in", mlp.in_proj, slice(d, 2 * d)), **tl_linear("W_out", "b_out", mlp.down_proj)}

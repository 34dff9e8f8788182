"""Attention over the paged KV cache for a flat varlen batch.

Tokens of many rows (sessions) are packed as [n_tokens, ...]. Each row has its own block table; a token
attends to every cached key of its row at a position <= its own (and inside the sliding window, if any).
On a GPU a Triton kernel reads the blocks in place (djinn/kernels/paged_attention.py); the portable path
gathers each row's keys and values into a padded batch and calls PyTorch SDPA. Both read only the row's own
positions, so nothing another row (or a block's previous owner) left in the cache reaches a row's result.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# Run-to-run determinism matters more than the last microsecond here: cuDNN's attention (PyTorch's first
# choice on Hopper) gives different bits on identical inputs, which would break bit-exact pause/resume.
DETERMINISTIC_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class AttentionMetadata:
    write_blocks: torch.Tensor  # [N] block of each new token's KV
    write_offsets: torch.Tensor  # [N] offset inside that block
    block_tables: torch.Tensor  # [B, max_blocks] int32, each row's blocks
    token_row: torch.Tensor  # [N] int32, the row of each token
    token_pos: torch.Tensor  # [N] int32, the position of each token
    max_context: int  # no token's position + 1 exceeds this (sizes the kernel's grid)
    prefill: bool = False  # some row has several tokens (a prompt): the kernel may take them together
    tallies: Optional[torch.Tensor] = None  # the engine's arrival tallies for the kernel (djinn/kernels/tallies.py)
    # Scores kept for the rows that read patterns in a step replayed from CUDA graphs: each token's slot (-1:
    # none) and, per slot and layer, its scores over the history ([n_slots, n_layers, n_heads, max_keys])
    score_slots: Optional[torch.Tensor] = None
    scores: Optional[torch.Tensor] = None
    # The portable path's padded layout (None when the Triton kernel runs):
    query_row: Optional[torch.Tensor] = None  # [N] row of each token in the padded query batch
    query_col: Optional[torch.Tensor] = None  # [N] column of each token in the padded query batch
    kv_blocks: Optional[torch.Tensor] = None  # [B, L] block holding each context position of each row
    kv_offsets: Optional[torch.Tensor] = None  # [B, L]
    mask: Optional[torch.Tensor] = None  # [B, 1, T, L] True where a query may attend a key (no window)
    query_pos: Optional[torch.Tensor] = None  # [B, 1, T, 1] each padded query's position
    seen: Optional[torch.Tensor] = None  # [B, 1, L, 1] True where some query of the row may attend the key
    max_query_len: int = 0


def paged_attention(
    q: torch.Tensor,  # [N, n_heads, d_head]
    k: torch.Tensor,  # [N, n_kv_heads, d_head]
    v: torch.Tensor,
    kv_layer: torch.Tensor,  # [n_blocks, 2, block_size, n_kv_heads, d_head] (a view into the pool)
    meta: AttentionMetadata,
    scale: float,
    rope=None,  # Rotary tables: rotate q and k by position first
    layer: int = 0,  # which layer's rows of `meta.scores` its scores go to
    window: int = 0,  # this layer's sliding window (0: none)
    softcap: float = 0.0,  # scores through softcap * tanh(score / softcap) (0: none)
) -> torch.Tensor:
    """Rotates q and k (with `rope`), writes this step's keys and values into the cache, then attends.
    Returns z: [N, n_heads, d_head]. Tokens with a score slot keep their scores in meta.scores."""
    keep = None if meta.scores is None else (meta.score_slots, meta.scores[:, layer])
    if meta.mask is None:
        from ..kernels import paged_attention as kernel
        from ..kernels.fused import rope_and_write_kv

        args = (kv_layer, meta.block_tables, meta.token_row, meta.token_pos, scale, window, meta.max_context)
        if not meta.prefill:  # one token a row: the attention kernel rotates and writes its keys itself
            return kernel.paged_attention_triton(q, *args, tally_slots=meta.tallies, new_keys=kernel.NewKeys(
                k, v, meta.write_blocks, meta.write_offsets, rope), scores=keep, softcap=softcap)
        if keep is not None:
            raise ValueError("scores are kept for one token a row only")
        q = rope_and_write_kv(q, k, v, kv_layer, meta.write_blocks, meta.write_offsets, meta.token_pos, rope)
        return kernel.paged_attention_triton(q, *args, kernel.prefill_query_tile(q.shape[1], kv_layer.shape[3]),
                                             meta.tallies, softcap=softcap)
    if rope is not None:
        positions = meta.token_pos.long()
        q, k = rope.apply(q, positions), rope.apply(k, positions)
    k_cache, v_cache = kv_layer[:, 0], kv_layer[:, 1]
    k_cache[meta.write_blocks, meta.write_offsets] = k
    v_cache[meta.write_blocks, meta.write_offsets] = v
    # The gathered layout also holds slots no query of the row may see (past its context: padded table
    # entries, a reused block's stale tail, another row's blocks). The mask gives them weight 0, but 0 x NaN
    # is NaN: they are zeroed, so a row reads nothing but its own keys and values, as the kernel does.
    keys = k_cache[meta.kv_blocks, meta.kv_offsets].transpose(1, 2).where(meta.seen, 0)  # [B, n_kv, L, d_head]
    values = v_cache[meta.kv_blocks, meta.kv_offsets].transpose(1, 2).where(meta.seen, 0)
    n_heads, d_head = q.shape[1], q.shape[2]
    queries = q.new_zeros(meta.block_tables.shape[0], meta.max_query_len, n_heads, d_head)
    queries[meta.query_row, meta.query_col] = q
    mask = window_mask(meta, window)
    if keep is not None:
        _keep_scores(queries, keys, meta, mask, scale, softcap, *keep)
    if softcap:  # SDPA has no soft-cap: the scores spelled out
        keys = keys.repeat_interleave(n_heads // keys.shape[1], 1)
        values = values.repeat_interleave(n_heads // values.shape[1], 1)
        scores = capped(torch.einsum("bthd,bhld->bhtl", queries, keys) * scale, softcap)
        weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        out = torch.einsum("bhtl,bhld->bhtd", weights, values)
    else:
        with sdpa_kernel(DETERMINISTIC_BACKENDS):
            out = F.scaled_dot_product_attention(
                queries.transpose(1, 2), keys, values, attn_mask=mask, scale=scale,
                enable_gqa=keys.shape[1] != n_heads,
            )  # [B, n_heads, T, d_head]
    return out.transpose(1, 2)[meta.query_row, meta.query_col]


def capped(scores: torch.Tensor, softcap: float) -> torch.Tensor:
    """Soft-capped scores: softcap * tanh(score / softcap) (0: unchanged)."""
    return torch.tanh(scores / softcap) * softcap if softcap else scores


def window_mask(meta: AttentionMetadata, window: int) -> torch.Tensor:
    """The portable layout's mask with a sliding window (0: the causal mask itself). Padding queries sit at
    position -1, which keeps every key the causal mask gave them (their softmax stays finite)."""
    if not window:
        return meta.mask
    masks = meta.__dict__.setdefault("_window_masks", {})
    if window not in masks:
        key_pos = torch.arange(meta.mask.shape[-1], device=meta.mask.device)
        masks[window] = meta.mask & (meta.query_pos - key_pos < window)
    return masks[window]


def _keep_scores(queries: torch.Tensor, keys: torch.Tensor, meta: AttentionMetadata, mask: torch.Tensor,
                 scale: float, softcap: float, slots: torch.Tensor, scores: torch.Tensor) -> None:
    """The portable path's scores of the tokens with a slot, as the kernel keeps them (over the padded layout's
    positions; -inf where masked)."""
    tokens = (slots >= 0).nonzero()[:, 0]
    if len(tokens) == 0:
        return
    q = queries[meta.query_row[tokens], meta.query_col[tokens]].float()  # [n, n_heads, d_head]
    k = keys[meta.query_row[tokens]].float()  # [n, n_kv, L, d_head]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    s = capped(torch.einsum("nhd,nhpd->nhp", q, k) * scale, softcap)
    seen = mask[meta.query_row[tokens], 0, meta.query_col[tokens]]  # [n, L]
    scores[slots[tokens].long(), :, :s.shape[-1]] = s.masked_fill(~seen[:, None, :], float("-inf"))


@dataclass
class RowKV:
    """Where one row's history lives in the cache, for the detailed path: `blocks[p]`, `offsets[p]` hold
    position p (0 .. the row's last token); its new tokens are the last `len(positions)` of them."""

    positions: torch.Tensor  # [T] long: the row's new tokens
    blocks: torch.Tensor  # [P] long
    offsets: torch.Tensor  # [P] long
    window: int  # sliding window (0: none)
    write: bool  # store the row's (edited) keys and values, replacing what the fast path wrote
    rope: Optional[object] = None  # the model's Rotary tables, for families with rotary embeddings


def detailed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, row: RowKV,
                       scale: float, hook, softcap: float = 0.0, qk_norm=None) -> torch.Tensor:
    """Attention of one row spelled out, each value handed to `hook` (see models/layers.py): q, k, v (before
    rotary), rot_q, rot_k, the scores (masked: -inf) and the pattern, both float32, over the row's whole
    history. The row's earlier keys and values come from the cache, its new ones from here. Returns z."""
    q, k, v = hook("attn.hook_q", q), hook("attn.hook_k", k), hook("attn.hook_v", v)
    if qk_norm is not None:  # q/k norms come after hook_q and hook_k, as in TransformerLens
        q, k = qk_norm(q, k)
    if row.rope is not None:
        q = hook("attn.hook_rot_q", row.rope.apply(q, row.positions))
        k = hook("attn.hook_rot_k", row.rope.apply(k, row.positions))
    n_new, n_heads = q.shape[0], q.shape[1]
    earlier = slice(0, row.blocks.shape[0] - n_new)
    new = slice(earlier.stop, None)
    if row.write:
        kv_layer[row.blocks[new], 0, row.offsets[new]] = k.to(kv_layer.dtype)
        kv_layer[row.blocks[new], 1, row.offsets[new]] = v.to(kv_layer.dtype)
    keys = torch.cat([kv_layer[row.blocks[earlier], 0, row.offsets[earlier]], k.to(kv_layer.dtype)])
    values = torch.cat([kv_layer[row.blocks[earlier], 1, row.offsets[earlier]], v.to(kv_layer.dtype)])
    group = n_heads // keys.shape[1]
    keys, values = keys.repeat_interleave(group, 1).float(), values.repeat_interleave(group, 1).float()
    scores = capped(torch.einsum("thd,phd->thp", q.float(), keys) * scale, softcap)
    key_pos = torch.arange(keys.shape[0], device=q.device)
    seen = key_pos[None, :] <= row.positions[:, None]
    if row.window:
        seen &= row.positions[:, None] - key_pos[None, :] < row.window
    scores = hook("attn.hook_attn_scores", scores.masked_fill(~seen[:, None, :], float("-inf")))
    pattern = hook("attn.hook_pattern", torch.softmax(scores, dim=-1).nan_to_num(0.0))
    return torch.einsum("thp,phd->thd", pattern, values).to(q.dtype)

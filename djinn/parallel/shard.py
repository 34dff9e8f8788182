"""A loaded model cut down to one rank's shard, in place: the q/k/v rows of its heads (and their KV heads),
the rows of its MLP columns (each expert's, for a mixture), and the matching input columns of the output
projections, whose partial products are summed over the ranks. Embeddings, norms, the router and the head
stay whole on every rank."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import InvalidRequest
from ..models.config import ModelConfig
from ..models.experts import Experts
from ..models.layers import Linear
from . import TensorParallel, all_reduce


class RowParallelLinear(Linear):
    """An output projection over this rank's input columns: its partial product, summed over the ranks. The
    bias is rank 0's alone, so that it is added once."""

    tp: TensorParallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduce(super().forward(x))

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(x, self.tp)


class ShardedExperts(Experts):
    """Each expert over this rank's columns; the mixture's partial outputs summed over the ranks."""

    tp: TensorParallel

    def mix(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return all_reduce(super().mix(x, weights), self.tp)

    def detailed(self, x: torch.Tensor, hook) -> torch.Tensor:
        return all_reduce(super().detailed(x, hook), self.tp)


def check_shardable(cfg: ModelConfig, world: int) -> None:
    """Raise a clear error where `cfg` cannot be split over `world` ranks."""
    for what, n in (("n_heads", cfg.n_heads), ("n_kv_heads", cfg.n_kv_heads), ("d_mlp", cfg.d_mlp)):
        if n % world:
            raise InvalidRequest(f"tensor_parallel={world} needs {what} divisible by {world}; this model has "
                                 f"{what}={n}")
    if cfg.qk_norm == "all":  # a norm over every head at once would need the other ranks' heads
        raise InvalidRequest("tensor parallelism does not split a q/k norm taken over all heads together (OLMo 2)")


def _rows(t: torch.Tensor, *pieces: tuple[int, int]) -> torch.Tensor:
    """The rows (first dimension) of each (start, length) piece, concatenated."""
    return torch.cat([t[a:a + n] for a, n in pieces]).contiguous()


def _take_rows(lin: nn.Linear, *pieces: tuple[int, int]) -> None:
    lin.weight = nn.Parameter(_rows(lin.weight.data, *pieces), requires_grad=False)
    if lin.bias is not None:
        lin.bias = nn.Parameter(_rows(lin.bias.data, *pieces), requires_grad=False)
    lin.out_features = lin.weight.shape[0]


def _row_parallel(lin: nn.Linear, tp: TensorParallel, first: int, n: int) -> None:
    lin.weight = nn.Parameter(lin.weight.data[:, first:first + n].contiguous(), requires_grad=False)
    if lin.bias is not None and tp.rank:
        lin.bias = nn.Parameter(torch.zeros_like(lin.bias.data), requires_grad=False)
    lin.in_features = n
    lin.__class__, lin.tp = RowParallelLinear, tp


def shard_model(model: nn.Module, tp: TensorParallel) -> None:
    """Keep `tp.rank`'s shard of `model` (either family) and attach `tp` to it as `model.tp`."""
    cfg: ModelConfig = model.cfg
    check_shardable(cfg, tp.world)
    r, dh = tp.rank, cfg.d_head
    h, kv, m = cfg.n_heads // tp.world, cfg.n_kv_heads // tp.world, cfg.d_mlp // tp.world
    q_rows, kv_rows = cfg.n_heads * dh, cfg.n_kv_heads * dh
    for block in model.blocks:
        attn = block.attn
        qkv, out = (attn.qkv_proj, attn.o_proj) if hasattr(attn, "qkv_proj") else (attn.qkv, attn.proj)
        # rows: every q head, then every k head, then every v head; this rank's heads of each
        _take_rows(qkv, (r * h * dh, h * dh), (q_rows + r * kv * dh, kv * dh),
                   (q_rows + kv_rows + r * kv * dh, kv * dh))
        _row_parallel(out, tp, r * h * dh, h * dh)
        attn.n_heads = h
        if hasattr(attn, "n_kv_heads"):
            attn.n_kv_heads = kv
        mlp = block.mlp
        if isinstance(mlp, Experts):
            w = mlp.in_proj.data  # [experts, gate rows then up rows, d_model]
            gate, up = w[:, r * m:(r + 1) * m], w[:, cfg.d_mlp + r * m:cfg.d_mlp + (r + 1) * m]
            mlp.in_proj = nn.Parameter(torch.cat([gate, up], dim=1).contiguous(), requires_grad=False)
            mlp.down_proj = nn.Parameter(mlp.down_proj.data[:, :, r * m:(r + 1) * m].contiguous(), requires_grad=False)
            mlp.__class__, mlp.tp = ShardedExperts, tp
            continue
        first, second = (mlp.in_proj, mlp.down_proj) if hasattr(mlp, "in_proj") else (mlp.fc, mlp.proj)
        gated = getattr(mlp, "gated", False)  # gate rows, then up rows: this rank's columns of each
        _take_rows(first, (r * m, m), *([(cfg.d_mlp + r * m, m)] if gated else []))
        _row_parallel(second, tp, r * m, m)
    model.tp = tp

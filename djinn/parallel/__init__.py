"""Tensor parallelism: one process per device, each holding a shard of every layer (its attention heads,
KV heads and MLP columns); the output projections are row-sharded, so one all-reduce after the attention
and one after the MLP make the residual stream whole on every rank.

Rank 0 is the caller's process: it runs the engine and tells the other ranks each block move and step
(mirror.py), which they run on their shards in the same order, replayed from CUDA graphs (the collectives
captured inside them) as on one device. Here: the group of one model and the
collectives the model and the runner use. Sites that a rank holds a part of (per head, per neuron) are
gathered whole wherever something reads or edits them, and split back for the forward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..sites import BRANCH

HEAD_SITES = frozenset({"attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_rot_q", "attn.hook_rot_k",
                        "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_result"})
NEURON_SITES = frozenset({"mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post"})


@dataclass
class TensorParallel:
    """A model's place in its tensor-parallel group (the model's `tp` attribute)."""

    rank: int
    world: int
    group: Any  # the torch.distributed process group
    leader: Optional[Any] = None  # rank 0: the group.Leader that tells the other ranks what to run
    index: int = 0  # which of the served models (the other ranks hold them in the same order)

    def engine_classes(self) -> tuple:
        """The KV pool and runner classes a worker of this model builds (rank 0's mirror every move)."""
        from functools import partial

        from .mirror import MirroredPool, MirroredRunner  # (mirror.py builds on the engine, which imports this)

        return partial(MirroredPool, self), partial(MirroredRunner, self)


def sharded(site) -> bool:
    """Whether each rank holds only its part of the site's value: per-head and per-neuron values (axis 1 of
    the token-first value), z and each expert's neurons included."""
    return site.local in HEAD_SITES or site.local in NEURON_SITES or site.local.startswith("mlp.experts.") or \
        (site.op == "attn_z" and site.kind == BRANCH)


def all_reduce(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """The sum over the ranks of each one's partial product."""
    dist.all_reduce(x, group=tp.group)
    return x


def gather(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """Every rank's part of a sharded value, whole: concatenated on axis 1 in rank order."""
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(tp.world)]
    dist.all_gather(parts, x, group=tp.group)
    return torch.cat(parts, dim=1)


def split(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """This rank's part of a whole value (axis 1)."""
    return x.chunk(tp.world, dim=1)[tp.rank].contiguous()

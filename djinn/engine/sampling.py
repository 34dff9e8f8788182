"""Batched sampling: greedy, temperature, top-k, top-p, with a per-request seed.

Randomness comes from a counter-based hash of (seed, step, token id) instead of a stateful generator, so
every row of a batch samples in one set of tensor ops, and a seed gives the same tokens whatever else is
in the batch and on CPU or GPU alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .batch import to_device

_M1 = 0xBF58476D1CE4E5B9 - (1 << 64)  # splitmix64 constants as signed int64
_M2 = 0x94D049BB133111EB - (1 << 64)
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch shifts arithmetically)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _splitmix(x: torch.Tensor) -> torch.Tensor:
    x = x ^ _shr(x, 30)
    x = x * _M1
    x = x ^ _shr(x, 27)
    x = x * _M2
    return x ^ _shr(x, 31)


def uniform_noise(seeds: torch.Tensor, counters: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, vocab] uniforms in (0, 1), a pure function of (seed, counter, token id)."""
    key = _splitmix(seeds * _GOLDEN + counters)
    x = _splitmix(key[:, None] + torch.arange(vocab, device=seeds.device, dtype=torch.int64)[None, :] * _GOLDEN)
    return (_shr(x, 11).double() + 0.5) * (2.0**-53)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def greedy_pick(logits: torch.Tensor, tallies: Optional[torch.Tensor] = None,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[2, B] int64 (into `out` if given): logits.argmax(-1), then 1 where the row's logits are all finite. On
    the GPU through one kernel that streams a row faster than PyTorch's reduction (`tallies`: the engine's
    arrival tallies, djinn/kernels/tallies.py)."""
    if logits.is_cuda and logits.dim() == 2 and logits.stride(-1) == 1:
        from ..kernels.argmax import argmax

        return argmax(logits, tallies, out)
    if out is None:
        out = torch.empty((2, logits.shape[0]), dtype=torch.int64, device=logits.device)
    out[0] = logits.argmax(-1)
    out[1] = torch.isfinite(logits).all(-1)
    return out


def sample(logits: torch.Tensor, params: list[SamplingParams], counters: list[int],
           tallies: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[2, B] int64 (into `out` if given): one token per row of `logits` [B, vocab], then 1 where the row's
    logits are all finite, else 0 (its token then means nothing)."""
    out = greedy_pick(logits, tallies, out)
    if all(p.greedy for p in params):
        return out
    dev = logits.device
    vocab = logits.shape[1]
    temp = to_device(torch.tensor([p.temperature if not p.greedy else 1.0 for p in params]), dev)
    top_k = to_device(torch.tensor([min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params]), dev)
    top_p = to_device(torch.tensor([p.top_p for p in params]), dev)
    seeds = to_device(torch.tensor([p.seed for p in params], dtype=torch.int64), dev)
    steps = to_device(torch.tensor(counters, dtype=torch.int64), dev)
    is_greedy = to_device(torch.tensor([p.greedy for p in params]), dev)

    scaled = logits.float() / temp[:, None]
    values, order = scaled.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=dev)[None, :]
    keep = ranks < top_k[:, None]
    probs = torch.softmax(values.masked_fill(~keep, float("-inf")), dim=-1)
    keep &= (probs.cumsum(-1) - probs) < top_p[:, None]  # smallest prefix whose mass reaches top_p
    keep[:, 0] = True
    gumbel = -torch.log(-torch.log(uniform_noise(seeds, steps, vocab)))
    score = (values.double() + gumbel.gather(1, order)).masked_fill(~keep, float("-inf"))
    sampled = order.gather(1, score.argmax(-1, keepdim=True)).squeeze(1)
    out[0] = torch.where(is_greedy, out[0], sampled)
    return out

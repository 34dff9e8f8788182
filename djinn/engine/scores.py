"""Per-position scores of a call, computed on the device: log-probabilities of the tokens, the logits at every
position (`return_logits="all"`), and the top-k of each generated token's distribution.

A step's logits at position p predict the token at p + 1. One step of a row scores its own positions (its
prompt in the prefill, one token a decode step); the call's result puts the steps' scores together by
position (`CallScores`). Only what a caller asked for leaves the device: a log-probability per token, k ids
and log-probabilities per new token, and vocabulary-sized rows only for `return_logits="all"`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..events import TopTokens
from .batch import to_device
from .staging import HostStager, Staged

CHUNK_ELEMENTS = 1 << 24  # float32 logits scored at once: bounds a long prompt's memory


@dataclass
class StepScores:
    """One row's scores of one step: its tokens are at positions start .. start + n - 1."""

    start: int
    n: int
    logprobs: Optional[Staged]  # [n]: at p, log p(token at p + 1 | tokens up to p)
    logits: Optional[Staged]  # [n, vocab] float32
    top: Optional[tuple[Staged, Staged]]  # ids and log-probabilities of the top k at the last position, [k] each

    @property
    def last(self) -> int:
        return self.start + self.n - 1


def score_step(unembed, start: int, next_tokens: list[int], last_logits: torch.Tensor, sampled: torch.Tensor,
               normed: Optional[torch.Tensor], logprobs: bool, all_logits: bool, top_k: int,
               stager: HostStager) -> StepScores:
    """A row's scores for one step. `last_logits` [vocab]: its last position's, which the sampler drew
    `sampled` (a one-element device tensor) from; `normed` [n, d_model]: the final norm's output at its
    positions (needed only for a step of several tokens); `next_tokens`: the tokens at start + 1 .. start + n - 1."""
    def parts():  # (float32 logits, the tokens they predict), a chunk of positions at a time
        if normed is not None and len(normed) > 1:
            prefix = normed[:-1]
            chunk = max(1, CHUNK_ELEMENTS // last_logits.shape[-1])
            ids = to_device(torch.tensor(next_tokens, dtype=torch.long), normed.device)
            for lo in range(0, len(prefix), chunk):
                yield unembed(prefix[lo:lo + chunk]).float(), ids[lo:lo + chunk]
        yield last_logits.float()[None], sampled.reshape(1)

    kept_lp, kept_logits, n = [], [], 0
    for logits, targets in parts():  # a chunk's logits are dropped once its values are taken (unless kept)
        n += len(targets)
        lsm = torch.log_softmax(logits, dim=-1)
        if logprobs:
            kept_lp.append(lsm.gather(1, targets[:, None])[:, 0])
        if all_logits:
            kept_logits.append(logits)
    out_lp = stager.stage(torch.cat(kept_lp)) if logprobs else None
    out_logits = stager.stage(torch.cat(kept_logits)) if all_logits else None
    top = None
    if top_k:
        values, indices = lsm[-1].topk(min(top_k, lsm.shape[-1]))
        top = (stager.stage(indices), stager.stage(values))
    return StepScores(start, n, out_lp, out_logits, top)


@dataclass
class CallScores:
    """A call's scores by position, put together from its steps when it completes."""

    steps: list[StepScores]

    def logprobs(self, first: int, n: int) -> torch.Tensor:
        """[n]: log p of each of the call's tokens (positions first .. first + n - 1) given those before it;
        NaN where the call did not compute the position before (the session's first token)."""
        out = torch.full((n,), float("nan"))
        for s in self.steps:
            if s.logprobs is None:
                continue
            v = s.logprobs.result()
            lo, hi = max(s.start + 1, first), min(s.start + 1 + len(v), first + n)
            if lo < hi:
                out[lo - first:hi - first] = v[lo - s.start - 1:hi - s.start - 1]
        return out

    def logits(self, first: int, n: int, vocab: int) -> torch.Tensor:
        """[n, vocab]: the logits at each of the call's positions (row i predicts the token after token i)."""
        out = torch.full((n, vocab), float("nan"))
        for s in self.steps:
            if s.logits is None:
                continue
            v = s.logits.result()
            lo, hi = max(s.start, first), min(s.start + len(v), first + n)
            if lo < hi:
                out[lo - first:hi - first] = v[lo - s.start:hi - s.start]
        return out

    def top(self, positions: list[int]) -> TopTokens:
        """The top-k of the distributions the tokens at `positions` were drawn from: ids and log-probs [n, k]."""
        by_last = {s.last: s for s in self.steps if s.top is not None}
        picked = [by_last[p - 1].top for p in positions]
        return TopTokens(torch.stack([ids.result() for ids, _ in picked]),
                         torch.stack([lp.result() for _, lp in picked]))

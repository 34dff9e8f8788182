"""The logit lens, on the device: a site's value through the model's final norm and unembedding, reduced to
the top k tokens and their log-probabilities at each position before anything leaves the GPU."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..events import TopTokens
from .batch import to_device
from .scores import CHUNK_ELEMENTS
from .staging import HostStager, Staged


@dataclass(frozen=True)
class Lens:
    top_k: int
    positions: Optional[frozenset[int]]  # None: every position


class StagedTop:
    """A lens result on its way to the host."""

    def __init__(self, ids: Staged, logprobs: Staged):
        self.ids, self.logprobs = ids, logprobs

    def result(self) -> TopTokens:
        return TopTokens(self.ids.result(), self.logprobs.result())


def apply_lens(model: torch.nn.Module, lens: Lens, value: torch.Tensor, start: int,
               stager: HostStager) -> Optional[StagedTop]:
    """The lens of one row's `value` [n_tokens, ..., d_model] at positions start.., at the positions it asks
    for (None if the row has none of them this step): ids and log-probs [n, ..., k]."""
    if lens.positions is not None:
        keep = [i for i in range(len(value)) if start + i in lens.positions]
        if not keep:
            return None
        value = value[to_device(torch.tensor(keep), value.device)]
    flat = value.reshape(-1, value.shape[-1])
    chunk = max(1, CHUNK_ELEMENTS // model.cfg.vocab_size)
    ids, logprobs = [], []
    for lo in range(0, len(flat), chunk):
        logits = model.unembed(model.ln_final(flat[lo:lo + chunk])).float()
        top = torch.log_softmax(logits, dim=-1).topk(min(lens.top_k, logits.shape[-1]), dim=-1)
        ids.append(top.indices)
        logprobs.append(top.values)
    shape = (*value.shape[:-1], -1)
    return StagedTop(stager.stage(torch.cat(ids).view(shape)), stager.stage(torch.cat(logprobs).view(shape)))

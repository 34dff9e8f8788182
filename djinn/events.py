"""What a generation reports to its caller: Token, Paused, Done and Error events, and the final result."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .errors import DjinnError
from .sites import SiteInfo


@dataclass(frozen=True)
class ParameterInfo:
    """A weight `client.weight(name)` reads, by its TransformerLens name, with its shape in that layout."""

    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str  # the checkpoint's architecture: "llama", "mistral", "gemma2", "gpt_neox", "gpt2", ...
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    vocab_size: int
    max_seq_len: int
    dtype: str
    device: str
    has_tokenizer: bool
    sites: tuple[SiteInfo, ...] = ()  # every public hook site, in forward order
    parameters: tuple[ParameterInfo, ...] = ()  # every weight client.weight() reads


@dataclass(frozen=True)
class TopTokens:
    """The k most likely tokens at each of n positions, best first: `ids` and `logprobs` are [n, k]."""

    ids: torch.Tensor
    logprobs: torch.Tensor


LensResult = TopTokens  # what a LogitLens reports for a (site, step): the top-k at each of its positions


@dataclass
class Token:
    token_id: int
    text: str
    step: int
    logits: Optional[torch.Tensor] = None  # [vocab_size] when return_logits=True


@dataclass
class Paused:
    """The session stopped mid-forward at `site` on `step`; `activation` is [len(positions), ...].

    Call `resume()` to continue unchanged or `resume(tensor)` with an edited activation of the same shape.
    """

    site: str
    step: int
    positions: list[int]
    activation: torch.Tensor
    pause_id: int = -1  # which pause this is: resuming an earlier, finished pause is refused
    _resume: Optional[Callable[[Optional[torch.Tensor]], None]] = field(default=None, repr=False)

    def resume(self, activation: Optional[torch.Tensor] = None) -> None:
        if self._resume is None:
            raise RuntimeError("this Paused event is not attached to a session")
        self._resume(activation)


@dataclass
class GenerateResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "length" | "stop" | "context"
    captures: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    # return_logits=True: [n_new_tokens, vocab_size], the distribution each new token was drawn from;
    # return_logits="all": [n_tokens, vocab_size] at each of the call's tokens (prompt and new), predicting the next
    logits: Optional[torch.Tensor] = None
    logprobs: Optional[torch.Tensor] = None  # logprobs=True: [n_tokens], log p(token | the tokens before it)
    top_logprobs: Optional[TopTokens] = None  # top_logprobs=k: [n_new_tokens, k]
    lens: dict[tuple[str, int], TopTokens] = field(default_factory=dict)  # LogitLens results by (site, step)


@dataclass
class Done:
    result: GenerateResult


@dataclass
class RunResult:
    """One prompt of a run answered: `index` is its place among the prompts the caller gave."""

    index: int
    result: GenerateResult


@dataclass
class RunDone:
    """Every prompt of a run answered."""

    n_prompts: int


@dataclass
class Error:
    error: DjinnError


"""A call's parameters (generate()'s keyword arguments), checked once: every call made with them shares the
result, so a run of many prompts checks its parameters at its start and not once a prompt.

Every value is checked here, so that none can fail inside a step that other rows share.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from .. import validation
from ..errors import InvalidRequest, TokenOutOfRange
from ..models.loading import DTYPES
from ..validation import shown
from .sampling import SamplingParams

# Sampling divides float32 logits by the temperature: within these bounds that never overflows.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-6, 1e4
MAX_TOP_LOGPROBS = 1024  # ids and log-probs of the k best tokens, each new token
MAX_TOP_K = (1 << 31) - 1  # more than any vocabulary: top_k beyond the vocabulary keeps every token


@dataclass(frozen=True)
class CallParams:
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: Optional[int]  # None: each call draws a seed of its own
    stop_tokens: frozenset[int]
    return_logits: Union[bool, str]  # False, True (the new tokens' distributions) or "all" (every position's)
    logprobs: bool
    top_logprobs: int
    activation_dtype: Optional[torch.dtype]  # None: the model's

    @property
    def scored(self) -> bool:
        """Whether the call asks for anything computed from its logits."""
        return bool(self.return_logits or self.logprobs or self.top_logprobs)

    def sampling(self) -> SamplingParams:
        seed = secrets.randbits(62) if self.seed is None else self.seed
        return SamplingParams(self.temperature, self.top_k, self.top_p, seed)


def check_call(vocab_size: int, end_ids: frozenset[int], *, max_new_tokens: int = 16, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, seed: Optional[int] = None,
               stop_tokens: Optional[Sequence[int]] = None, return_logits: Union[bool, str] = False,
               logprobs: bool = False, top_logprobs: int = 0, activation_dtype: Optional[str] = None) -> CallParams:
    """The parameters checked, for a model of `vocab_size` whose tokenizer ends text at `end_ids` (the stop
    tokens unless the call names its own). Raises InvalidRequest (TokenOutOfRange) naming the first bad one.

    `return_logits` True gives the distribution each new token was drawn from, "all" the logits at every token
    of the call, prompt and new (the last new token is then fed too, to have its row); `logprobs` log p of
    each token of the call; `top_logprobs` k the top-k of each new token's distribution."""
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise InvalidRequest(f"max_new_tokens must be a non-negative integer, got {shown(max_new_tokens)}")
    temperature = validation.number(temperature, "temperature", 0.0, MAX_TEMPERATURE)
    if 0 < temperature < MIN_TEMPERATURE:
        raise InvalidRequest(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {temperature!r}")
    top_k = validation.integer(top_k, "top_k (0: off)", 0, MAX_TOP_K)
    top_p = validation.number(top_p, "top_p", 0.0, 1.0)
    if top_p == 0:
        raise InvalidRequest("top_p must be in (0, 1], got 0")
    if seed is not None:
        seed = validation.integer(seed, "seed", -(1 << 63), (1 << 64) - 1) % (1 << 62)
    stop = end_ids if stop_tokens is None else frozenset(token_ids(vocab_size, stop_tokens, "stop token"))
    if return_logits not in (False, True, "all"):
        raise InvalidRequest(f"return_logits must be true, false or 'all', got {shown(return_logits)}")
    if not isinstance(logprobs, bool):
        raise InvalidRequest(f"logprobs must be true or false, got {shown(logprobs)}")
    top_logprobs = validation.integer(top_logprobs, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if activation_dtype is not None and activation_dtype not in DTYPES:
        raise InvalidRequest(f"activation_dtype must be one of {sorted(DTYPES)}, got {shown(activation_dtype)}")
    return CallParams(max_new_tokens, temperature, top_k, top_p, seed, stop, return_logits, logprobs, top_logprobs,
                      DTYPES[activation_dtype] if activation_dtype else None)


def token_ids(vocab: int, ids, what: str) -> list[int]:
    """`ids` as a list of token ids of a vocabulary of `vocab`, each checked."""
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    try:
        ids = list(ids)
    except TypeError:
        raise InvalidRequest(f"a prompt is text or a list of token ids, got {type(ids).__name__}") from None
    if ids and all(type(t) is int for t in ids) and 0 <= min(ids) and max(ids) < vocab:
        return ids  # the common case, checked at C speed
    for t in ids:
        if not isinstance(t, int) or isinstance(t, bool):
            raise InvalidRequest(f"{what}s must be integers, got {shown(t)}")
        if not 0 <= t < vocab:
            raise TokenOutOfRange(f"{what} {t} is outside the vocabulary [0, {vocab})")
    return ids

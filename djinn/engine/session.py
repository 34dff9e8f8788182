"""Server-resident state: sessions (token history, KV blocks, persistent interventions), the request a
session is running, and checkpoints."""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, Callable, Optional, Union

import torch

from ..errors import DjinnError, Forbidden
from ..validation import shown
from .kv_pool import CopyJob
from .lens import StagedTop
from .plan import Plan
from .batch import RowSpan
from .runner import Pause
from .sampling import SamplingParams
from .scores import StepScores
from .staging import Staged

_arrival = itertools.count()


def owned(records: dict, key: Any, owner: str, what: str, missing: type[DjinnError], hint: str = "") -> Any:
    """The record `key` of `records` (a checkpoint, a run) if `owner` owns it; else `missing` where there is
    none, Forbidden where it is another owner's."""
    rec = records.get(key) if isinstance(key, str) else None
    if rec is None:
        raise missing(f"no {what} {shown(key)}{hint}")
    if rec.owner != owner:
        raise Forbidden(f"{what} {shown(key)} belongs to another user")
    return rec


def _no_listener(event: object) -> None:
    """Where a forked call's events go until a stream attaches."""


class SessionState(str, Enum):
    IDLE = "idle"
    RUNNING = "running"
    PAUSED = "paused"


@dataclass(eq=False)
class Request:
    """One generate/stream call."""

    max_new_tokens: int
    sampling: SamplingParams
    stop_tokens: frozenset[int]
    return_logits: Union[bool, str]  # False, True (the new tokens' distributions) or "all" (every position's)
    plan: Plan
    sink: Callable[[object], None]
    history_len_before: int
    activation_dtype: Optional[torch.dtype] = None  # dtype of activations sent back (None: the model's)
    logprobs: bool = False  # log p of every token of the call, computed on the device
    top_logprobs: int = 0  # k: the top-k of each new token's distribution
    kv_blocks: int = 0  # the device blocks the call may grow its session to
    waiting_since: Optional[float] = None  # when it found no KV memory to run in (None: not waiting)
    passed_over: bool = False  # left out of the last step for its token budget: goes first in the next
    seq: int = field(default_factory=lambda: next(_arrival))
    step: int = 0
    generated: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    scores: list[StepScores] = field(default_factory=list)
    # with return_logits="all" the call's last token is fed too (its logits are the last row): the reason the
    # call ends for once that step is read
    finishing: Optional[str] = None
    captures: dict[tuple[str, int], Staged] = field(default_factory=dict)
    lenses: dict[tuple[str, int], StagedTop] = field(default_factory=dict)
    decoder: Optional[object] = None  # IncrementalDecoder of the generated text
    text_context: list[int] = field(default_factory=list)  # the token before the new ones: their text follows it
    pause: Optional[Pause] = None  # where the row waits at a breakpoint, its state saved
    paused_since: float = 0.0
    resumed: bool = False  # the paused row re-enters at its site in the next step
    # (index among the sampled ids, its position) of this call's next token while a step in flight samples it
    pending: Optional[tuple[int, int]] = None
    # a run's forward-only prompt ends at this site (its last capture's); None: the whole forward
    stop_after: Optional[int] = None

    @property
    def scores_positions(self) -> bool:
        """Whether a step scores every position of a row (else only its last, the one the sampler reads)."""
        return self.logprobs or self.return_logits == "all"

    @property
    def scored(self) -> bool:
        return self.scores_positions or self.top_logprobs > 0

    def fork_for(self, session: "Session") -> "Request":
        """This paused call, copied for `session` (a fork made at the pause); it has no listener until a
        stream attaches. Tensors saved at the pause are cloned, so either copy may be resumed with edits."""
        p, row = self.pause, self.pause.row
        new_row = replace(row, session=session, span=RowSpan(row.span.start, row.span.n_tokens, session.blocks),
                          tokens=list(row.tokens), resid=row.resid.clone(),
                          branch=None if row.branch is None else row.branch.clone())
        fork = replace(self, sink=_no_listener, seq=next(_arrival), generated=list(self.generated),
                       logits=list(self.logits), scores=list(self.scores), captures=dict(self.captures),
                       lenses=dict(self.lenses), decoder=copy.deepcopy(self.decoder),
                       pause=Pause(new_row, p.site, p.activation))
        new_row.request = fork
        return fork


@dataclass(eq=False)
class Session:
    id: str
    owner: str
    model: str
    history: list[int] = field(default_factory=list)  # every token; history[kv_len:] is not in the cache yet
    kv_len: int = 0
    blocks: list[int] = field(default_factory=list)  # device blocks
    host_blocks: Optional[list[int]] = None  # set while swapped out to host
    interventions: list = field(default_factory=list)  # persistent, as the client sent them
    plan: Plan = field(default_factory=Plan)  # the same, compiled
    state: SessionState = SessionState.IDLE
    request: Optional[Request] = None
    last_used: float = 0.0
    run: Optional[str] = None  # the run (runs.py) this session holds one prompt of: nobody else sees it

    @property
    def swapped(self) -> bool:
        return self.host_blocks is not None


@dataclass(eq=False)
class CheckpointRecord:
    id: str
    owner: str
    model: str
    history: list[int]
    kv_len: int
    interventions: list
    plan: Plan
    host_blocks: list[int]
    job: CopyJob
    frozen_device_blocks: list[int]  # held until the background copy is done
    started: float
    finished: Optional[float] = None


@dataclass(frozen=True)
class SessionInfo:
    id: str
    model: str
    state: str  # idle | running | paused | swapped
    n_tokens: int
    kv_len: int
    n_device_blocks: int
    n_host_blocks: int
    interventions: int
    queue_position: Optional[int] = None  # 1 for the call that has waited longest for KV memory, ...

"""Many prompts of one owner in one call (`client.run`, `client.run_iter`): each prompt runs in a session
of its own that nobody lists or reaches, closed as soon as its result is out, or when the call fails or
is cancelled: no session outlives the call.

The caller feeds prompts; at most `window` of them are fed and not yet answered, so a caller that takes
its results slowly slows its own feed, and the engine holds the state of at most `window` prompts for it.
Results go to the run's sink as they finish (`RunResult`), then `RunDone`; the first prompt that fails
ends the run with its error (`Error`, naming the prompt), and its other prompts are cancelled.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from ..errors import Cancelled, DjinnError, InvalidRequest, LimitExceeded, UnknownSession
from ..events import Done, Error, RunDone, RunResult
from ..validation import integer
from .call import CallParams
from .plan import Plan
from .session import owned

if TYPE_CHECKING:
    from .engine import Engine

MAX_WINDOW = 4096  # prompts of one run in flight at once


@dataclass(frozen=True)
class RunItem:
    """One prompt of a run: its index in the caller's order, and interventions of its own (after the run's)."""

    index: int
    prompt: Any
    interventions: Sequence = ()


@dataclass(eq=False)
class BatchRun:
    id: str
    owner: str
    model: str
    call: CallParams  # generate()'s keyword arguments, the same for every prompt, checked once
    plan: Plan  # the interventions every prompt has, compiled once
    sink: Callable[[object], None]
    window: int
    live: dict[str, int] = field(default_factory=dict)  # session id -> prompt index, until its result is out
    fed: int = 0
    answered: int = 0
    last: bool = False  # the caller fed its last prompt
    over: bool = False  # finished, failed or cancelled: the prompts' events are ignored from now on


class Runs:
    """The engine's runs; every method runs on the engine thread."""

    def __init__(self, engine: "Engine"):
        self.engine = engine
        self.runs: dict[str, BatchRun] = {}
        self._closing: list[str] = []  # sessions whose prompt is answered (or whose run ended), to close

    def start(self, owner: str, model: Optional[str], sink: Callable[[object], None], window: int,
              params: dict) -> str:
        w = self.engine._worker(model)
        window = integer(window, "window", 1, MAX_WINDOW)
        if params.get("breakpoints"):
            raise InvalidRequest("a run takes no breakpoints (nobody could resume them): stream a session instead")
        # bad interventions or parameters are refused now, not at the first prompt
        params = dict(params)
        plan = w.compiler.compile(list(params.pop("interventions", ())))
        call = self.engine.check_call(w, params)
        run = BatchRun(secrets.token_urlsafe(16), owner, w.name, call, plan, sink, window)
        self.runs[run.id] = run
        return run.id

    def feed(self, rid: str, owner: str, items: Sequence[RunItem], last: bool = False) -> None:
        """Start `items`; `last`: no more will come. A prompt refused at its start fails the run (raised here)."""
        self.tidy()  # the answered prompts' sessions go before new ones come
        run = self._run(rid, owner)
        if run.last:
            raise InvalidRequest(f"run {rid} was told its last prompt already")
        if run.fed + len(items) - run.answered > run.window:
            raise LimitExceeded(f"{run.fed - run.answered} prompts of this run are unanswered and its window is "
                                f"{run.window}: feed more as results arrive")
        if [item.index for item in items] != list(range(run.fed, run.fed + len(items))):
            raise InvalidRequest(f"a run's prompts are numbered in the order they are fed, from 0: these must be "
                                 f"{run.fed} to {run.fed + len(items) - 1}, got {[item.index for item in items][:8]}")
        w = self.engine.workers[run.model]
        longest, new = w.cfg.max_seq_len, run.call.max_new_tokens
        need = sum(w.pool.blocks_for(min(longest, _length(item.prompt) + new)) for item in items)
        self.engine._check_quota(w, owner, need, f"these {len(items)} prompts")  # the owner's share, at once
        for item in items:
            # named by the run's (unguessable) id and the prompt's number; only the run reaches it (Engine._session
            # refuses a run's sessions)
            sid = f"{run.id}/{item.index}"
            s = self.engine.open_session(owner, run.model, sid, run.id)
            run.live[sid] = item.index
            run.fed += 1
            try:
                plan = run.plan.extend(w.compiler.compile(list(item.interventions))) if item.interventions else run.plan
                self.engine.start_call(s, item.prompt, lambda ev, _sid=sid: self._on_event(run, _sid, ev), run.call,
                                       plan, quota_checked=True)
            except DjinnError as e:
                self._end(run, Error(_naming(e, item.index)))
                raise _naming(e, item.index) from None
        run.last = last
        self._maybe_done(run)

    def cancel(self, rid: str, owner: str) -> None:
        run = self.runs.get(rid)
        if run is not None and run.owner == owner:
            self._end(run, None)
            self.tidy()

    def tidy(self) -> None:
        """Close the sessions of answered prompts and of ended runs (between steps, never inside one)."""
        closing, self._closing = self._closing, []
        for sid in closing:
            s = self.engine.sessions.pop(sid, None)
            if s is not None:
                self.engine.workers[s.model].close(s, Cancelled("the run this prompt belonged to ended"))

    def _run(self, rid: str, owner: str) -> BatchRun:
        return owned(self.runs, rid, owner, "run", UnknownSession, " (finished, failed, cancelled, or never started)")

    def _on_event(self, run: BatchRun, sid: str, ev: object) -> None:
        if run.over or sid not in run.live:
            return
        if isinstance(ev, Done):
            index = run.live.pop(sid)
            self._closing.append(sid)
            run.answered += 1
            run.sink(RunResult(index, ev.result))
            self._maybe_done(run)
        elif isinstance(ev, Error):
            self._end(run, Error(_naming(ev.error, run.live[sid])))

    def _maybe_done(self, run: BatchRun) -> None:
        if run.last and not run.over and run.answered == run.fed:
            self._end(run, RunDone(run.answered))

    def _end(self, run: BatchRun, event: Optional[object]) -> None:
        """The run is over: its sessions close, and its sink gets `event` (none for a cancel)."""
        if run.over:
            return
        run.over = True
        self.runs.pop(run.id, None)
        self._closing.extend(run.live)
        run.live.clear()
        if event is not None:
            run.sink(event)


def _length(prompt: Any) -> int:
    """A prompt's tokens (a text's, tokenized already; one more for a BOS, to be safe)."""
    ids = getattr(prompt, "ids", prompt)
    return (len(ids) if hasattr(ids, "__len__") else 0) + 1


def _naming(e: DjinnError, index: int) -> DjinnError:
    """The same typed error, its message naming the prompt it came from."""
    return type(e)(f"prompt {index}: {e.message}")

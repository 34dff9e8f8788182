"""The engine: models, sessions, checkpoints, and the commands that act on them.

Not thread-safe by design: one thread (see `service.py`) owns it and the device, and runs commands
between steps. Every command checks that the caller owns what it touches.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from .. import validation
from ..replica import new_id, replica_name, replica_of
from ..validation import shown
from ..errors import (CapacityError, Cancelled, ContextOverflow, Forbidden, InvalidRequest, LimitExceeded, NotPaused,
                      SessionBusy, SessionExpired, UnknownCheckpoint, UnknownModel, UnknownParameter,
                      UnknownSession)
from ..events import Error, ModelInfo, ParameterInfo
from ..interventions import Breakpoint
from ..models.loading import LoadedModel
from ..models.tokenizer import IncrementalDecoder
from ..sites import RESID, SiteInfo
from .call import CallParams, check_call, token_ids
from .detail import accept
from .kv_pool import KVPool
from .plan import Plan
from .stats import EngineStats
from .runs import RunItem, Runs
from .session import CheckpointRecord, Request, Session, SessionInfo, SessionState, owned
from .worker import ModelWorker



@dataclass(frozen=True)
class TextTokens:
    """A text prompt tokenized before it reached the engine thread (`Engine.encode_prompt`); the engine adds
    the BOS a string prompt gets."""

    ids: tuple[int, ...]


Prompt = Union[str, TextTokens, Sequence[int]]
EXPIRED_REMEMBERED = 100_000  # expired session ids kept to tell their owners why they are gone


class Engine:
    # commands that need no session settled first (service.py): they create sessions and touch no other
    UNSETTLED_COMMANDS = frozenset({"start_run", "feed_run"})

    def __init__(self, models: Sequence[LoadedModel], kv_memory: Optional[int] = None,
                 kv_blocks: Optional[int] = None, host_kv_blocks: Optional[int] = None, block_size: int = 16,
                 max_step_tokens: int = 4096, pause_ttl: float = 300.0, cuda_graphs: Optional[bool] = None,
                 idle_ttl: Optional[float] = 3600.0, kv_share_per_key: float = 1.0, queue_timeout: float = 60.0,
                 replica: Optional[str] = None):
        """`cuda_graphs`: steps replay CUDA graphs where they fit (default: on a GPU). On the CPU, True runs
        the graphs' static-buffer path with nothing captured, which is how the tests check it.

        Sharing between owners: a session nobody touched for `idle_ttl` seconds is closed (None: never);
        one owner's sessions and checkpoints hold at most `kv_share_per_key` of a model's KV blocks (device
        and host together); a request that fits the pool but finds it full waits for blocks to free up, at
        most `queue_timeout` seconds.

        `replica`: the name every session and checkpoint id starts with (see `djinn/replica.py`)."""
        if not models:
            raise UnknownModel("the engine needs at least one model")
        self.workers: dict[str, ModelWorker] = {}
        self.stats = EngineStats()
        for m in models:
            n = kv_blocks if kv_blocks is not None else self._blocks_from_budget(m, kv_memory, block_size,
                                                                                  len(models))
            self.workers[m.name] = ModelWorker(m, n, host_kv_blocks if host_kv_blocks is not None else n,
                                               block_size, max_step_tokens, self.stats, cuda_graphs)
        self.default_model = models[0].name
        self.pause_ttl, self.idle_ttl, self.queue_timeout = pause_ttl, idle_ttl, queue_timeout
        if not 0 < kv_share_per_key <= 1:
            raise InvalidRequest(f"kv_share_per_key must be in (0, 1], got {kv_share_per_key!r}")
        self.kv_share_per_key = kv_share_per_key
        self.replica = replica_name(replica)
        self.expired: OrderedDict[str, str] = OrderedDict()  # recently expired session -> owner (a clear error)
        self.sessions: dict[str, Session] = {}
        self.checkpoints: dict[str, CheckpointRecord] = {}
        self.runs = Runs(self)

    @staticmethod
    def _blocks_from_budget(m: LoadedModel, kv_memory: Optional[int], block_size: int, n_models: int) -> int:
        dev = next(m.model.parameters()).device
        per_block = KVPool.bytes_per_block(m.config, block_size, next(m.model.parameters()).dtype)
        if kv_memory is None:
            if dev.type == "cuda":  # half of what is free once weights are in, shared among the models
                free, _ = torch.cuda.mem_get_info(dev)
                kv_memory = int(free * 0.5 / n_models)
            else:
                kv_memory = 256 << 20
        # never more than what every model's full context in 64 sessions would need
        cap = 64 * -(-m.config.max_seq_len // block_size)
        return max(1, min(kv_memory // per_block, cap))

    # ------------------------------------------------------------------ lookups

    def _worker(self, model: Optional[str]) -> ModelWorker:
        name = model or self.default_model
        if name not in self.workers:
            raise UnknownModel(f"unknown model {shown(name)}; this server has {sorted(self.workers)}")
        return self.workers[name]

    def _session(self, sid: str, owner: str) -> Session:
        s = self.sessions.get(sid) if isinstance(sid, str) else None
        if s is None or s.run is not None:  # a run's sessions are its own
            if isinstance(sid, str) and self.expired.get(sid) == owner:
                raise SessionExpired(f"session {sid} was idle longer than its time-to-live ({self.idle_ttl:g} s) "
                                     f"and was closed")
            raise UnknownSession(f"no session {shown(sid)} (closed, expired, or never created)"
                                 f"{self._elsewhere(sid)}")
        if s.owner != owner:
            raise Forbidden(f"session {shown(sid)} belongs to another user")
        s.last_used = time.monotonic()  # any call of its owner keeps it alive
        return s

    def _elsewhere(self, ident: object) -> str:
        """Why an id of another replica is unknown here: a balancer sent it to the wrong one."""
        r = replica_of(ident)
        if r is None or r == self.replica:
            return ""
        here = f"replica {self.replica}" if self.replica else "no replica"
        return f"; its id names replica {shown(r)}, this server is {here}"

    def _idle(self, s: Session, what: str) -> None:
        if s.state != SessionState.IDLE:
            raise SessionBusy(f"session {s.id} is {s.state.value}; {what} needs it idle")

    # ------------------------------------------------------------------ models and sessions

    def models(self) -> list[ModelInfo]:
        out = []
        for w in self.workers.values():
            c = w.cfg
            out.append(ModelInfo(w.name, c.arch, c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.d_head,
                                 c.vocab_size, c.max_seq_len, str(w.dtype).removeprefix("torch."), str(w.device),
                                 w.tokenizer is not None, tuple(w.sites.info()),
                                 tuple(ParameterInfo(k, tuple(v.shape), str(v.dtype).removeprefix("torch."))
                                       for k, v in w.weights.items())))
        return out

    def sites(self, model: Optional[str] = None) -> list[SiteInfo]:
        return list(self._worker(model).sites.info())

    def weight(self, name: str, model: Optional[str] = None, start: Optional[int] = None,
               stop: Optional[int] = None) -> torch.Tensor:
        """A copy of the weight of that TransformerLens name (ModelInfo.parameters), on the host; with
        `start`/`stop`, of those rows of its first dimension (a large weight travels in parts)."""
        w = self._worker(model)
        t = w.weights.get(name) if isinstance(name, str) else None
        if t is None:
            raise UnknownParameter(f"model {w.name} has no weight {shown(name)}; ModelInfo.parameters lists its "
                                   f"{len(w.weights)} weights (e.g. {', '.join(list(w.weights)[:3])})")
        n = len(t)
        start = 0 if start is None else validation.integer(start, "start", 0, n)
        stop = n if stop is None else validation.integer(stop, "stop", start, n)
        return t[start:stop].detach().to("cpu", copy=True)

    def create_session(self, owner: str, model: Optional[str] = None) -> str:
        return self.open_session(owner, self._worker(model).name, new_id(self.replica)).id

    def open_session(self, owner: str, model: str, sid: str, run: Optional[str] = None) -> Session:
        """A new session `sid` of `model` (an existing one's name); `run`: the run it holds a prompt of."""
        s = Session(sid, owner, model, last_used=time.monotonic(), run=run)
        self.sessions[sid] = self.workers[model].sessions[sid] = s
        return s

    def list_sessions(self, owner: str) -> list[SessionInfo]:
        return [self._info(s) for s in self.sessions.values() if s.owner == owner and s.run is None]

    def session_info(self, sid: str, owner: str) -> SessionInfo:
        return self._info(self._session(sid, owner))

    def _info(self, s: Session) -> SessionInfo:
        state = "swapped" if s.swapped and s.state == SessionState.IDLE else s.state.value
        return SessionInfo(s.id, s.model, state, len(s.history), s.kv_len, len(s.blocks),
                           len(s.host_blocks or []), len(s.interventions), self.workers[s.model].scheduler.queue_position(s))

    def close_session(self, sid: str, owner: str) -> None:
        s = self._session(sid, owner)
        self.workers[s.model].close(s, Cancelled("the session was closed"))
        del self.sessions[sid]

    def set_interventions(self, sid: str, owner: str, items: Sequence) -> None:
        s = self._session(sid, owner)
        self._idle(s, "set_interventions")
        plan = self.workers[s.model].compiler.compile(list(items))
        s.interventions, s.plan = list(items), plan

    def tokenize(self, text: str, model: Optional[str] = None, prepend_bos: Optional[bool] = None) -> list[int]:
        """The ids `text` is fed as when it opens a session (BOS first where the model's tokenizer adds one),
        or with `prepend_bos` False as a later prompt of a session is (True: BOS first in any case)."""
        w = self._worker(model)
        ids = self._encode(w, text)
        if prepend_bos is None:
            prepend_bos = w.tokenizer.add_bos
        return ([w.tokenizer.bos_id] if prepend_bos and w.tokenizer.bos_id is not None else []) + ids

    def to_str_tokens(self, tokens: Union[str, Sequence[int]], model: Optional[str] = None) -> list[str]:
        """Each token's text as it reads in place (spaces kept), for text (tokenized as `tokenize` does) or
        ids; the pieces join into the decoded text."""
        w = self._worker(model)
        ids = (self.tokenize(tokens, model) if isinstance(tokens, str)
               else token_ids(w.cfg.vocab_size, tokens, "token id"))
        if w.tokenizer is None:
            raise InvalidRequest(f"model {w.name} has no tokenizer")
        decoder = IncrementalDecoder(w.tokenizer)
        return [decoder.push(t) for t in ids]

    def detokenize(self, ids: Sequence[int], model: Optional[str] = None) -> str:
        w = self._worker(model)
        if w.tokenizer is None:
            raise InvalidRequest(f"model {w.name} has no tokenizer")
        return w.tokenizer.decode(token_ids(w.cfg.vocab_size, ids, "token id"))

    # ------------------------------------------------------------------ generation

    def generate(self, sid: str, owner: str, prompt: Prompt, sink: Callable[[object], None], **params) -> None:
        """Start a request of session `sid` (see `begin`)."""
        self.begin(self._session(sid, owner), prompt, sink, **params)

    def begin(self, s: Session, prompt: Prompt, sink: Callable[[object], None], *,
              interventions: Sequence = (), breakpoints: Sequence[Breakpoint] = (), **params) -> None:
        """Start a request; events go to `sink` from the engine thread. Raises on bad input, changing nothing.
        `params`: generate()'s keyword arguments (call.check_call says what each asks for). Paused activations
        and captures arrive in the model's dtype, or in `activation_dtype` if given."""
        w = self.workers[s.model]
        self.start_call(s, prompt, sink, self.check_call(w, params),
                        w.compiler.compile(list(interventions), list(breakpoints)))

    @staticmethod
    def check_call(w: ModelWorker, params: dict) -> CallParams:
        """generate()'s keyword arguments checked for the model of `w` (its stop tokens unless they name some)."""
        return check_call(w.cfg.vocab_size, w.tokenizer.end_ids if w.tokenizer else frozenset(), **params)

    def start_call(self, s: Session, prompt: Prompt, sink: Callable[[object], None], call: CallParams, own: Plan,
                   quota_checked: bool = False) -> None:
        """Start a request of checked parameters and compiled interventions (`own`, after the session's).
        `quota_checked`: the caller checked the owner's KV share for this call (a run checks a batch of its
        prompts at once)."""
        self._idle(s, "generate")
        w = self.workers[s.model]
        cfg = w.cfg
        tokens = self._prompt_tokens(w, s, prompt)
        max_new_tokens = call.max_new_tokens
        total = len(s.history) + len(tokens)
        if total == s.kv_len:
            raise InvalidRequest("empty prompt on a session with nothing to continue from")
        if total > cfg.max_seq_len:
            raise ContextOverflow(f"prompt brings the session to {total} tokens; the context is {cfg.max_seq_len}")
        need = w.pool.blocks_for(min(cfg.max_seq_len, total + max_new_tokens))
        usable = w.pool.device_blocks.n_blocks - w.reserved_blocks
        if need > usable:
            raise CapacityError(f"this request needs {need} KV blocks but the pool has {usable}; it can never fit")
        if not quota_checked:
            self._check_quota(w, s.owner, need - len(s.host_blocks if s.swapped else s.blocks), "this request")
        last = total - 1 + max(0, max_new_tokens - 1) + (call.return_logits == "all" and max_new_tokens > 0)
        self._check_reach(w, own, s.kv_len, min(last, cfg.max_seq_len - 1))
        plan = s.plan.extend(own)
        req = Request(max_new_tokens, call.sampling(), call.stop_tokens, call.return_logits, plan, sink,
                      len(s.history), call.activation_dtype, call.logprobs, call.top_logprobs, need)
        if s.run is not None and max_new_tokens == 0 and not call.scored:
            # the session closes after this forward: it needs to go no further than its last capture
            req.stop_after = max((w.sites[k].host for k, ps in plan.captures.items() if ps), default=None)
        s.history.extend(tokens)
        req.text_context = s.history[-1:]
        s.request, s.state, s.last_used = req, SessionState.RUNNING, time.monotonic()

    def encode_prompt(self, sid: str, prompt: Prompt) -> Prompt:
        """A text prompt as TextTokens, tokenized by the calling thread (so that a long text keeps no one's
        step waiting); anything else as it is. Safe off the engine thread: it reads only the session's model,
        and generate() checks everything else."""
        s = self.sessions.get(sid) if isinstance(sid, str) else None
        if not isinstance(prompt, str) or s is None:
            return prompt
        return TextTokens(tuple(self._encode(self.workers[s.model], prompt)))

    def _encode(self, w: ModelWorker, text: str) -> list[int]:
        if w.tokenizer is None:
            raise InvalidRequest(f"model {w.name} has no tokenizer; send token ids")
        return w.tokenizer.encode(validation.text(text, "a text prompt"))

    def _prompt_tokens(self, w: ModelWorker, s: Session, prompt: Prompt) -> list[int]:
        if isinstance(prompt, (str, TextTokens)):
            ids = self._encode(w, prompt) if isinstance(prompt, str) else list(prompt.ids)
            return ([w.tokenizer.bos_id] if not s.history and w.tokenizer.add_bos else []) + ids
        return token_ids(w.cfg.vocab_size, prompt, "token id")

    @staticmethod
    def _check_reach(w: ModelWorker, plan: Plan, first: int, last: int) -> None:
        """A call's interventions name only positions it computes (first..last): one it never reaches would
        do nothing, silently."""
        named = [(w.sites[e.site].name, e.positions) for es in plan.edits.values() for e in es] + \
                [(w.sites[p.site].name, p.lens.positions) for ps in plan.captures.values() for p in ps if p.lens]
        for site, positions in named:
            outside = sorted(p for p in positions or () if not first <= p <= last)
            if outside:
                earlier = f"; earlier calls computed positions 0 to {first - 1}" if first else ""
                raise InvalidRequest(f"positions {outside[:8]} at {site} are outside what this call computes: "
                                     f"positions {first} to {last}{earlier}")

    def resume(self, sid: str, owner: str, activation: Optional[torch.Tensor] = None,
               pause_id: Optional[int] = None) -> None:
        """Continue a paused session, with `activation` in place of the paused one if given. With `pause_id`
        (from the Paused event) only that pause is resumed, never a later one."""
        s = self._session(sid, owner)
        req = s.request
        if not self._waiting(s):
            raise NotPaused(f"session {sid} is not paused at a breakpoint")
        if pause_id is not None and pause_id != req.pause.id:
            raise NotPaused(f"that pause of session {sid} was already resumed; it is now paused at "
                            f"{req.pause.site}, step {req.pause.row.step}")
        row = req.pause.row
        if activation is not None and row.detail is not None:  # paused inside an op: it is finished from there
            w = self.workers[s.model]
            site, shown_value = w.sites[row.detail.site], req.pause.activation
            new = w.compiler.tensor(activation, f"replacement activation for {site.name}", tuple(shown_value.shape),
                                    None, shown_value.dtype)
            row.detail.replacement = accept(site, new)
        elif activation is not None:
            w = self.workers[s.model]
            site = w.sites.sites[row.entry]
            current = row.resid if site.kind == RESID else row.branch
            new = w.compiler.tensor(activation, f"replacement activation for {site.name}", tuple(current.shape), None)
            if site.kind == RESID:
                row.resid = new
            else:
                row.branch = new
        req.resumed = True

    @staticmethod
    def _waiting(s: Session) -> bool:
        """Paused at a breakpoint and not yet resumed."""
        r = s.request
        return s.state == SessionState.PAUSED and r is not None and r.pause is not None and not r.resumed

    def attach(self, sid: str, owner: str, sink: Callable[[object], None]) -> None:
        """Send the events of the session's call in progress to `sink` from now on (a client reconnecting,
        or the first client of a fork made at a pause). A paused session announces its pause again; the
        stream that had the call before is told with a Cancelled error."""
        s = self._session(sid, owner)
        if s.request is None:
            raise InvalidRequest(f"session {sid} has no call in progress to attach to")
        previous, s.request.sink = s.request.sink, sink
        try:
            previous(Error(Cancelled("another stream attached to this session")))
        except Exception:
            pass
        if self._waiting(s):
            self.workers[s.model].announce_pause(s)

    def cancel(self, sid: str, owner: str) -> None:
        s = self._session(sid, owner)
        if s.request is not None:
            self.workers[s.model].fail(s, Cancelled("request cancelled"))

    # ------------------------------------------------------------------ checkpoints and forks

    def checkpoint(self, sid: str, owner: str, check_count: Optional[Callable[[int], None]] = None) -> str:
        """Start copying the session to host memory; returns the checkpoint's id at once. `check_count`, if
        given, sees how many checkpoints the owner keeps and may refuse another (a server's per-key limit,
        checked here so that check and creation are one step of the engine thread)."""
        s = self._session(sid, owner)
        if check_count is not None:
            check_count(sum(rec.owner == owner for rec in self.checkpoints.values()))
        self._idle(s, "checkpoint")
        w = self.workers[s.model]
        n = len(s.host_blocks) if s.swapped else len(s.blocks)
        self._check_quota(w, owner, n, "this checkpoint")
        if w.pool.host_blocks.n_free < n:
            raise CapacityError(f"checkpoint needs {n} host KV blocks, {w.pool.host_blocks.n_free} free")
        host = w.pool.host_blocks.allocate(n)
        frozen: list[int] = []
        if s.swapped:
            w.pool.copy_host(s.host_blocks, host)
            job = None
        else:
            frozen = list(s.blocks)
            w.pool.device_blocks.incref(frozen)  # the session copies on write from now on
            job = w.pool.to_host(frozen, host)
        cid = new_id(self.replica)
        rec = CheckpointRecord(cid, owner, s.model, list(s.history), s.kv_len, list(s.interventions), s.plan, host,
                               job, frozen, time.monotonic())
        self.checkpoints[cid] = rec
        self._poll_checkpoint(rec)
        return cid

    def _poll_checkpoint(self, rec: CheckpointRecord) -> None:
        if rec.finished is None and (rec.job is None or rec.job.done()):
            self.workers[rec.model].pool.device_blocks.decref(rec.frozen_device_blocks)
            rec.frozen_device_blocks, rec.finished = [], time.monotonic()

    def _checkpoint(self, cid: str, owner: str) -> CheckpointRecord:
        return owned(self.checkpoints, cid, owner, "checkpoint", UnknownCheckpoint, self._elsewhere(cid))

    def list_checkpoints(self, owner: str) -> list[str]:
        return [cid for cid, rec in self.checkpoints.items() if rec.owner == owner]

    def checkpoint_status(self, cid: str, owner: str) -> dict:
        rec = self._checkpoint(cid, owner)
        self._poll_checkpoint(rec)
        gpu = rec.job.gpu_seconds() if rec.job is not None else None
        return {"id": cid, "done": rec.finished is not None, "n_tokens": len(rec.history),
                "n_blocks": len(rec.host_blocks), "n_bytes": rec.job.n_bytes if rec.job is not None else 0,
                "copy_seconds": gpu if gpu is not None else (
                    None if rec.finished is None else rec.finished - rec.started)}

    def restore(self, cid: str, owner: str) -> str:
        """A new session in exactly the checkpoint's state (its KV comes to the device when it next runs)."""
        rec = self._checkpoint(cid, owner)
        if rec.job is not None and rec.finished is None:
            rec.job.wait()
            self._poll_checkpoint(rec)
        w = self.workers[rec.model]
        sid = self.create_session(owner, rec.model)
        s = self.sessions[sid]
        w.pool.host_blocks.incref(rec.host_blocks)  # shared with the checkpoint; never written in place
        s.host_blocks = list(rec.host_blocks)
        s.history, s.kv_len = list(rec.history), rec.kv_len
        s.interventions, s.plan = list(rec.interventions), rec.plan
        return sid

    def delete_checkpoint(self, cid: str, owner: str) -> None:
        rec = self._checkpoint(cid, owner)
        if rec.job is not None and rec.finished is None:
            rec.job.wait()
            self._poll_checkpoint(rec)
        self.workers[rec.model].pool.host_blocks.decref(rec.host_blocks)
        del self.checkpoints[cid]

    def fork(self, sid: str, owner: str) -> str:
        """A new session sharing this one's KV blocks; whichever writes into a shared block copies it first.
        A session paused at a breakpoint forks mid-forward: the fork waits at the same site, with the same
        activation and call, for its own resume (attach a stream to it to get its events)."""
        s = self._session(sid, owner)
        waiting = self._waiting(s)
        if not waiting:
            self._idle(s, "fork")
        w = self.workers[s.model]
        nid = self.create_session(owner, s.model)
        t = self.sessions[nid]
        if s.swapped:
            w.pool.host_blocks.incref(s.host_blocks)
            t.host_blocks = list(s.host_blocks)
        else:
            w.pool.device_blocks.incref(s.blocks)
            t.blocks = list(s.blocks)
        t.history, t.kv_len = list(s.history), s.kv_len
        t.interventions, t.plan = list(s.interventions), s.plan
        if waiting:
            t.request = s.request.fork_for(t)
            t.request.paused_since = time.monotonic()
            t.state = SessionState.PAUSED
        return nid

    # ------------------------------------------------------------------ the loop

    # ------------------------------------------------------------------ runs of many prompts (runs.py)

    def start_run(self, owner: str, model: Optional[str], sink: Callable[[object], None], window: int,
                  params: dict) -> str:
        """A run of many prompts with generate()'s `params` for each; its events go to `sink`."""
        return self.runs.start(owner, model, sink, window, params)

    def feed_run(self, rid: str, owner: str, items: Sequence[RunItem], last: bool = False) -> None:
        self.runs.feed(rid, owner, items, last)

    def cancel_run(self, rid: str, owner: str) -> None:
        """End the run now: every session of it closes; its sink hears nothing more."""
        self.runs.cancel(rid, owner)

    def encode_run_prompt(self, model: Optional[str], prompt: Prompt) -> Prompt:
        """As encode_prompt, for a run's prompt (of `model`), off the engine thread."""
        return TextTokens(tuple(self._encode(self._worker(model), prompt))) if isinstance(prompt, str) else prompt

    # ------------------------------------------------------------------ the loop

    def has_work(self) -> bool:
        return any(w.has_work() for w in self.workers.values())

    def step(self) -> None:
        for w in self.workers.values():
            if w.has_work():
                w.step()

    def idle(self) -> bool:
        """With no step to run: record one graph segment that a step ran eagerly without; returns whether one
        was left."""
        return any(w.runner.record_pending() for w in self.workers.values())

    def drain(self) -> None:
        """Finish reading the steps in flight, so that commands see every session settled."""
        for w in self.workers.values():
            w.drain()

    def housekeeping(self) -> None:
        """Between steps: expire paused and idle sessions past their time-to-live, finish background copies,
        let requests waiting for KV memory try again."""
        now = time.monotonic()
        for s in list(self.sessions.values()):
            if s.state == SessionState.PAUSED and s.request and not s.request.resumed \
                    and now - s.request.paused_since > self.pause_ttl:
                self.workers[s.model].close(s, SessionExpired(
                    f"session {s.id} stayed paused longer than its time-to-live ({self.pause_ttl:g} s) and was freed"))
                del self.sessions[s.id]
            elif (self.idle_ttl is not None and s.state == SessionState.IDLE and s.run is None
                  and now - s.last_used > self.idle_ttl):
                self.workers[s.model].close(s)
                del self.sessions[s.id]
                self.expired[s.id] = s.owner
                while len(self.expired) > EXPIRED_REMEMBERED:
                    self.expired.popitem(last=False)
        self.runs.tidy()
        for rec in self.checkpoints.values():
            self._poll_checkpoint(rec)
        for w in self.workers.values():
            w.expire_waiting(now, self.queue_timeout)

    # ------------------------------------------------------------------ sharing between owners

    def kv_quota(self, w: ModelWorker) -> int:
        """The KV blocks (device and host together) one owner may hold in `w`'s pools."""
        total = w.pool.device_blocks.n_blocks - w.reserved_blocks + w.pool.host_blocks.n_blocks
        return max(1, int(self.kv_share_per_key * total))

    def blocks_held(self, w: ModelWorker, owner: str) -> int:
        """Distinct blocks `owner`'s sessions and checkpoints hold in `w`'s pools, plus what its calls in
        progress may still grow into."""
        device, host, growth = set(), set(), 0
        for s in self.sessions.values():
            if s.owner == owner and s.model == w.name:
                held = s.host_blocks if s.swapped else s.blocks
                (host if s.swapped else device).update(held)
                if s.request is not None:
                    growth += max(0, s.request.kv_blocks - len(held))
        for rec in self.checkpoints.values():
            if rec.owner == owner and rec.model == w.name:
                host.update(rec.host_blocks)
        return len(device) + len(host) + growth

    def _check_quota(self, w: ModelWorker, owner: str, more: int, what: str) -> None:
        if self.kv_share_per_key >= 1 or more <= 0:
            return
        held, quota = self.blocks_held(w, owner), self.kv_quota(w)
        if held + more > quota:
            raise LimitExceeded(f"{what} needs {more} more KV blocks; this key holds {held} of its {quota} "
                                f"({self.kv_share_per_key:.0%} of the pool): close sessions or delete checkpoints")

    def sessions_by_state(self) -> dict[str, int]:
        counts = {"idle": 0, "running": 0, "paused": 0, "swapped": 0}
        for s in self.sessions.values():
            counts[self._info(s).state] += 1
        return counts

    def lifetimes(self) -> dict[str, float]:
        """The sessions' time-to-live settings and the runs going (for /metrics)."""
        return {"idle_ttl": float("inf") if self.idle_ttl is None else self.idle_ttl, "pause_ttl": self.pause_ttl,
                "runs": len(self.runs.runs), "run_sessions": sum(s.run is not None for s in self.sessions.values())}

    def pool_usage(self) -> dict[str, dict[str, float]]:
        now, out = time.monotonic(), {}
        for name, w in self.workers.items():
            waiting = w.scheduler.waiting()
            out[name] = {"device_used": w.pool.device_blocks.n_used, "device_total": w.pool.device_blocks.n_blocks,
                         "host_used": w.pool.host_blocks.n_used, "host_total": w.pool.host_blocks.n_blocks,
                         "waiting": len(waiting), "longest_wait": now - waiting[0].waiting_since if waiting else 0.0}
        return out

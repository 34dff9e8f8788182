"""One model's share of the engine: each step schedules (scheduler.py: which rows, their KV blocks), runs
(runner.py, cuda_graphs.py: the forward), then updates (sampling, the sessions' tokens, pauses and captures,
the events their callers get)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..errors import CapacityError, DjinnError, InternalError, NonFinite
from ..kernels import tallies
from ..events import Done, Error, GenerateResult, Paused, Token
from ..models.loading import LoadedModel
from ..models.tokenizer import IncrementalDecoder
from ..sites import SiteTable
from .batch import to_device
from .cuda_graphs import BUCKETS
from .kv_pool import KVPool
from .plan import Compiler
from .runner import Pause, Row, Runner, StepOutput
from .sampling import sample
from .scheduler import Scheduler
from .scores import CallScores, StepScores, score_step
from .session import Request, Session, SessionState
from .staging import Staged
from .stats import EngineStats

log = logging.getLogger("djinn.engine")


def _emit(req: Request, event: object) -> None:
    """Hand an event to the request's caller; a failing sink must not disturb the other rows of the step."""
    try:
        req.sink(event)
    except Exception:
        log.exception("event sink failed")


@dataclass(eq=False)
class Announcement:
    """A pause whose Paused event goes out once its activation has reached the host."""

    session: Session
    pause: Pause
    activation: Staged


@dataclass(eq=False)
class InFlight:
    """A step whose GPU work is queued and whose sampled ids the host has not read yet."""

    rows: list[Row]  # the rows that finished the forward, in the order of `tokens`
    tokens: torch.Tensor  # host tensor the sampled ids arrive in, then 1 for each row whose logits are finite
    done: Optional[torch.cuda.Event]  # recorded after the copy (None on the CPU: already there)
    logits: Optional[Staged]  # float32 logits of the rows at `logit_rows`
    logit_rows: list[int]
    edits_ok: Optional[Staged] = None  # StepOutput.edits_ok, in a step with edits
    spans: Optional[list[tuple[int, int]]] = None  # each row's tokens there
    scores: dict[int, StepScores] = field(default_factory=dict)  # by index in `rows`: rows whose call scores
    ended: list[Row] = field(default_factory=list)  # forward-only rows that stopped before the final site


class ModelWorker:
    def __init__(self, loaded: LoadedModel, n_blocks: int, n_host_blocks: int, block_size: int,
                 max_step_tokens: int, stats: EngineStats, cuda_graphs: Optional[bool] = None):
        self.stats = stats
        self.name, self.cfg, self.model, self.tokenizer = loaded.name, loaded.config, loaded.model, loaded.tokenizer
        p = next(self.model.parameters())
        self.dtype, self.device = p.dtype, p.device
        tp = getattr(self.model, "tp", None)  # tensor parallel: rank 0's pool and runner tell the other ranks
        pool_class, runner_class = (KVPool, Runner) if tp is None else tp.engine_classes()
        self.pool = pool_class(self.cfg, n_blocks, n_host_blocks, block_size, self.dtype, self.device)
        self.sites = SiteTable(self.cfg, self.model.detail_sites)
        self.weights = self.model.weights()  # by TransformerLens name, views of the model's
        self.compiler = Compiler(self.sites, self.dtype, self.device)
        self.max_step_tokens = max_step_tokens
        # A step's sampled ids stay on the device, where the next step reads them (see step()); the host gets
        # them through alternating pinned buffers, with after them whether each row's logits were finite.
        self.sampled = torch.zeros(2 * max(max_step_tokens, BUCKETS[-1]), dtype=torch.long, device=self.device)
        on_gpu = self.device.type == "cuda"
        # the step's kernels that finish a result in the same launch count their programs in here: a slot per
        # (token, KV head) for attention, per row for the greedy pick
        self.tallies = tallies.new(len(self.sampled) * self.cfg.n_kv_heads, self.device) if on_gpu else None
        self.runner = runner_class(self.model, self.pool.kv, self.sites, block_size,
                                   self.device, self.sampled, self.tallies)
        self._host_tokens = [torch.zeros(len(self.sampled), dtype=torch.long, pin_memory=on_gpu) for _ in range(2)]
        self._inflight: Optional[InFlight] = None
        self.reserved_blocks = 0
        if on_gpu if cuda_graphs is None else cuda_graphs:
            (scratch,) = self.pool.device_blocks.allocate(1)  # graph padding and rows outside their sites write here
            self.reserved_blocks = 1
            self.runner.use_graphs(scratch, stats, min(self.cfg.max_seq_len, 4096), max_step_tokens, capture=on_gpu)
        self.sessions: dict[str, Session] = {}
        self.scheduler = Scheduler(self.pool, self.sessions, max_step_tokens, self.cfg.max_seq_len)
        self._announcing: list[Announcement] = []

    # ------------------------------------------------------------------ scheduling

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self._announcing) or self._inflight is not None

    def expire_waiting(self, now: float, timeout: float) -> None:
        """Fail the calls that waited for KV memory longer than `timeout`; let the others try again."""
        for s in self.scheduler.overdue(now, timeout):
            waited = now - s.request.waiting_since
            self.fail(s, CapacityError(f"waited {waited:.1f} s for KV memory (the limit is {timeout:g} s): the "
                                       f"pool stayed full of other sessions' caches"))

    # ------------------------------------------------------------------ the step

    def step(self) -> None:
        """Run one step. Its GPU work is queued, then the host reads and hands out the previous step's tokens
        while the GPU computes: rows whose token is still on the device were scheduled with `feed_from`,
        and a row whose call turns out to have ended (a stop token) is dropped when its step is read."""
        self._emit_ready_pauses()
        rows = self.scheduler.schedule({id(r.session) for r in self._inflight.rows} if self._inflight else set())
        if not rows:
            self.drain()
            if self._announcing and not any(self.scheduler.runnable(s) for s in self.sessions.values()):
                # nothing to run but an activation on its way to the host: wait for it with the GIL released
                # (a poll loop would hold the GIL against the client thread about to receive it)
                self._announcing[0].activation.result()
                self._emit_ready_pauses()
            return
        started = time.perf_counter()
        saved = [(r.entry, r.resid, r.branch, r.detail) for r in rows]  # a failed step may have moved rows' state
        try:
            out = self.runner.run(rows)
            self.drain()
            self._inflight = self._launch_sampling(out)
            self._settle(out)
        except Exception as e:
            self._isolate(rows, saved, e)
        else:
            if len(out.paused) == 1 and not any(self.scheduler.runnable(s) for s in self.sessions.values()):
                self._load_ahead(out.paused[0].row)
        elapsed = time.perf_counter() - started
        st = self.stats
        st.steps, st.step_seconds, st.last_step_seconds = st.steps + 1, st.step_seconds + elapsed, elapsed
        st.tokens_processed += sum(r.span.n_tokens for r in rows)

    def _load_ahead(self, row: Row) -> None:
        """The host would only wait for the client now: get the row's resumed step ready meanwhile. Only an
        early start: if it fails, the resume loads its step as usual (and meets the failure there, if real)."""
        try:
            self.runner.load_ahead([row])
        except Exception:
            log.exception("loading a resumed step ahead failed")

    def _isolate(self, rows: list[Row], saved: list[tuple], error: Exception) -> None:
        """A step failed: run its rows again one at a time, so that a row whose own data makes the step fail
        fails alone (with the error it raises) and the others go on. A fault no single row explains fails
        every row, each told why; the engine keeps serving."""
        self.drain()  # the step before is fine: hand out its tokens first
        if self.runner.graphs is not None:
            self.runner.graphs.forget_inputs()
        live = []
        for r, (entry, resid, branch, detail) in zip(rows, saved):
            if r.session.request is not r.request:
                continue  # its call ended with the step before (a stop token)
            r.entry, r.resid, r.branch, r.detail, r.request.pending = entry, resid, branch, detail, None
            if r.feed_from is not None:  # its token is on the host now
                r.tokens, r.feed_from = [r.session.history[r.span.start]], None
            live.append(r)
        for r in live:
            try:
                if len(live) == 1:
                    raise error
                out = self.runner.run([r])
                self._inflight = self._launch_sampling(out)
                self._settle(out)
                self.drain()
            except Exception as e:
                self.drain()
                self.fail(r.session, self._typed(e))

    @staticmethod
    def _typed(e: Exception) -> DjinnError:
        if isinstance(e, DjinnError):
            return e
        log.exception("engine step failed", exc_info=e)
        return InternalError(f"engine step failed: {type(e).__name__}: {e}")

    def _settle(self, out: StepOutput) -> None:
        """Record the step's captures and pauses (after the previous step's tokens went out, to keep order)."""
        for row, name, staged in out.captures:
            if row.session.request is row.request:
                row.request.captures[(name, row.step)] = staged
        for row, name, staged in out.lenses:
            if row.session.request is row.request:
                row.request.lenses[(name, row.step)] = staged
        for p in out.paused:
            s = p.row.session
            if s.request is not p.row.request:
                continue
            s.state = SessionState.PAUSED
            s.request.pause = p
            s.request.paused_since = time.monotonic()
            self.stats.pauses += 1
            self.announce_pause(s)
        self._emit_ready_pauses()

    def _launch_sampling(self, out: StepOutput) -> Optional[InFlight]:
        """Queue sampling of the finished rows and the copy of their ids to the host; nothing waits here."""
        keep = [i for i, r in enumerate(out.finished) if r.session.request is r.request]
        ended = [r for r in out.stopped if r.session.request is r.request]
        for r in ended:  # nothing to sample: the call ends once the step is read
            r.request.pending = (-1, r.span.start + r.span.n_tokens)
        if not keep:
            return InFlight([], self._host_tokens[0][:0], self._step_read_event(), None, [], ended=ended) \
                if ended else None
        rows = [out.finished[i] for i in keep]
        if len(rows) < len(out.finished):
            out.logits = out.logits[to_device(torch.tensor(keep), self.device)]
        n = len(rows)
        sample(out.logits, [r.request.sampling for r in rows], [r.step for r in rows], self.tallies,
               out=self.sampled[:2 * n].view(2, n))
        scores = {}
        for i, r in enumerate(rows):
            r.request.pending = (i, r.span.start + r.span.n_tokens)
            req = r.request
            if req.scored:
                scores[i] = score_step(self.model.unembed, r.span.start, r.tokens[1:], out.logits[i],
                                       self.sampled[i:i + 1], out.normed.get(id(r)), req.logprobs,
                                       req.return_logits == "all", req.top_logprobs, self.runner.stager)
        logit_rows = [i for i, r in enumerate(rows) if r.request.return_logits]
        logits = self.runner.stager.stage(out.logits[logit_rows].float()) if logit_rows else None
        edits_ok = spans = None
        if out.edits_ok is not None:
            edits_ok, spans = self.runner.stager.stage(out.edits_ok), [out.spans[id(r)] for r in rows]
        host = self._host_tokens[0][:2 * n]
        self._host_tokens.reverse()  # the other buffer may still be read for the step before
        host.copy_(self.sampled[:2 * n], non_blocking=True)
        return InFlight(rows, host, self._step_read_event(), logits, logit_rows, edits_ok, spans, scores, ended)

    def _step_read_event(self) -> Optional[torch.cuda.Event]:
        """An event after everything queued so far (None on the CPU, where it is all done already)."""
        if self.device.type != "cuda":
            return None
        done = torch.cuda.Event()
        done.record()
        return done

    def drain(self) -> None:
        """Read the step in flight, if any, and hand out its tokens: afterwards every session is settled."""
        f, self._inflight = self._inflight, None
        if f is None:
            return
        if f.done is not None:  # waits with the GIL released, so client threads run meanwhile
            f.done.synchronize()
        n = len(f.rows)
        values = f.tokens.tolist()
        tokens, finite = values[:n], values[n:]
        edits_ok = f.edits_ok.result() if f.edits_ok is not None else None
        host_logits = dict(zip(f.logit_rows, f.logits.result())) if f.logits is not None else {}
        for i, (row, tok) in enumerate(zip(f.rows, tokens)):
            s, req = row.session, row.request
            if s.request is not req:
                continue  # the call ended while this step ran
            req.pending = None
            if edits_ok is not None and not edits_ok[slice(*f.spans[i])].all():
                self.fail(s, NonFinite(f"an edit of this call made an activation NaN or Inf in step {req.step}; "
                                       f"the call ends here (the session keeps the tokens before this step)"))
                continue
            if not finite[i]:
                self.fail(s, NonFinite(f"the logits of step {req.step} of this call are NaN or Inf (its "
                                       f"activations overflowed {str(self.dtype).removeprefix('torch.')}); the "
                                       f"call ends here (the session keeps the tokens before this step)"))
                continue
            s.kv_len += row.span.n_tokens
            req.step += 1
            if i in f.scores:
                req.scores.append(f.scores[i])
            if req.finishing is not None or req.max_new_tokens == 0:  # a step that only fed the call's tokens
                self._complete(s, req.finishing or "length")
                continue
            s.history.append(tok)
            req.generated.append(tok)
            self.stats.tokens_generated += 1
            logits = host_logits.get(i)
            if logits is not None:
                req.logits.append(logits)
            _emit(req, Token(tok, self._text_delta(req), req.step - 1, logits))
            if tok in req.stop_tokens:
                self._end(s, "stop")
            elif len(req.generated) >= req.max_new_tokens:
                self._end(s, "length")
            elif s.kv_len >= self.cfg.max_seq_len:
                self._complete(s, "context")
        for row in f.ended:
            s, req = row.session, row.request
            if s.request is req:
                req.pending, req.step = None, req.step + 1
                s.kv_len += row.span.n_tokens  # (its later layers were never written: the session closes now)
                self._complete(s, "length")

    def _text_delta(self, req: Request) -> str:
        if self.tokenizer is None:
            return ""
        if req.decoder is None:
            req.decoder = IncrementalDecoder(self.tokenizer, req.text_context)
        return req.decoder.push(req.generated[-1])

    def announce_pause(self, s: Session) -> None:
        """Copy the paused activation towards the host; the Paused event goes out once it is there."""
        p = s.request.pause
        act = p.activation if s.request.activation_dtype is None else p.activation.to(s.request.activation_dtype)
        # an attach while an announcement is still on its way replaces it: one Paused event per listener
        self._announcing = [a for a in self._announcing if a.pause is not p]
        self._announcing.append(Announcement(s, p, self.runner.stager.stage(act)))

    def _emit_ready_pauses(self) -> None:
        still = []
        for a in self._announcing:
            s, p = a.session, a.pause
            if s.request is None or s.request.pause is not p:
                continue  # cancelled meanwhile
            if not a.activation.ready():
                still.append(a)
                continue
            _emit(s.request, Paused(p.site, p.row.step, p.row.positions, a.activation.result(), pause_id=p.id))
        self._announcing = still

    def _end(self, s: Session, reason: str) -> None:
        """The call has its last token: it completes, once that token is fed if its logits are asked for."""
        if s.request.return_logits == "all":
            s.request.finishing = reason  # the scheduler feeds it as any unfed token
        else:
            self._complete(s, reason)

    def _complete(self, s: Session, reason: str) -> None:
        req = s.request
        dt = req.activation_dtype
        captures = {k: v.result() if dt is None else v.result().to(dt) for k, v in req.captures.items()}
        first, n = req.history_len_before, len(s.history) - req.history_len_before
        scores = CallScores(req.scores)
        if req.return_logits == "all":
            logits = scores.logits(first, n, self.cfg.vocab_size)
        else:
            logits = torch.stack(req.logits) if req.return_logits and req.logits else None
        logprobs = scores.logprobs(first, n) if req.logprobs else None
        top = scores.top(list(range(len(s.history) - len(req.generated), len(s.history)))) \
            if req.top_logprobs and req.generated else None
        text = self.tokenizer.decode_after(req.text_context, req.generated) if self.tokenizer else ""
        s.request, s.state = None, SessionState.IDLE
        self.scheduler.trim(s)  # a step already queued past the end may have taken a block
        self.stats.requests_finished += 1
        lens = {k: v.result() for k, v in req.lenses.items()}
        _emit(req, Done(GenerateResult(text, list(req.generated), reason, captures, logits, logprobs, top, lens)))

    def fail(self, s: Session, error: DjinnError) -> None:
        """End the session's request with `error`; the session keeps every committed token."""
        req = s.request
        if req is None:
            return
        if req.step == 0:  # the prompt never went through: forget it
            del s.history[req.history_len_before:]
        s.request, s.state = None, SessionState.IDLE
        self.scheduler.trim(s)
        _emit(req, Error(error))

    def close(self, s: Session, error: Optional[DjinnError] = None) -> None:
        if s.request is not None and error is not None:
            self.fail(s, error)
        s.request, s.state = None, SessionState.IDLE
        self.scheduler.free(s)
        self.sessions.pop(s.id, None)

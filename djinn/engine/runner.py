"""Runs one engine step: every row's forward from where it stands, site by site.

A fresh row starts at the embedding; a resumed row re-enters after the site it paused at, carrying the
residual stream (and branch value) it had there. At every site the rows that asked get their edits as
batched tensor ops, captures are staged to the host, and rows with a breakpoint leave the batch with
their state saved. No layer runs twice and no row waits for another.
"""
from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..errors import NonFinite
from ..models.context import ForwardContext
from ..parallel import gather, sharded, split
from ..sites import RESID, Site, SiteTable
from .batch import RowSpan, build_context, to_device
from .cuda_graphs import StepGraphs
from .detail import DetailPause, DetailRun, OpDetail, edit_row, edits_inside, present, row_kv
from .lens import StagedTop, apply_lens
from .plan import Edit, Plan, Probe, fold_edits
from .step_plan import StepPlan, plan_step
from .staging import HostStager, Staged, StagedPart
from .stats import EngineStats


@dataclass(eq=False)
class Row:
    """One session's work in a step."""

    session: object
    request: object  # the call this row computes for; a row whose call ended meanwhile is dropped
    span: RowSpan
    tokens: list[int]
    step: int
    plan: Plan
    feed_from: Optional[int] = None  # the token is still on the device: this index of the sampled ids
    entry: Optional[int] = None  # the site a resumed row paused at (it re-enters after it); None: a fresh row
    resid: Optional[torch.Tensor] = None
    branch: Optional[torch.Tensor] = None
    detail: Optional[DetailPause] = None  # paused at a detail site: its op is finished after the resume

    @property
    def positions(self) -> list[int]:
        return list(range(self.span.start, self.span.start + self.span.n_tokens))

    def pause_here(self, probe, site: int, resid: torch.Tensor, branch: Optional[torch.Tensor],
                   activation: torch.Tensor, lo: int, hi: int) -> "Pause":
        """Leave the step after chain site `site`, keeping this row's state there (its tokens are lo:hi of the
        batch); `activation`: the row's value at the probe's site, as the client is shown it."""
        self.resid = resid[lo:hi].clone()
        self.branch = branch[lo:hi].clone() if branch is not None else None
        self.entry = site
        return Pause(self, probe.name, activation.clone())

    def reenter(self) -> None:
        """The row's saved state is back in the batch: it computes from here as any row."""
        self.resid = self.branch = self.entry = self.detail = None


@dataclass(eq=False)
class Pause:
    row: Row
    site: str  # the public name the breakpoint used
    activation: torch.Tensor  # on the device, [n_tokens, ...]
    id: int = field(default_factory=itertools.count().__next__)


@dataclass
class StepOutput:
    finished: list[Row] = field(default_factory=list)
    logits: Optional[torch.Tensor] = None  # [len(finished), vocab]: each finished row's last token
    paused: list[Pause] = field(default_factory=list)
    stopped: list[Row] = field(default_factory=list)  # forward-only rows that ended before the final site
    captures: list[tuple[Row, str, Staged]] = field(default_factory=list)
    lenses: list[tuple[Row, str, StagedTop]] = field(default_factory=list)
    # In a step with edits: per token (rows in the order the step was given them), whether every edited value
    # stayed finite; `spans` maps each row to its tokens there.
    edits_ok: Optional[torch.Tensor] = None
    spans: dict[int, tuple[int, int]] = field(default_factory=dict)  # id(row) -> (first token, end)
    # the final norm's output at every token of the finished rows of several tokens that score each position
    normed: dict[int, torch.Tensor] = field(default_factory=dict)  # id(row) -> [n_tokens, d_model]

    def watch_edits(self, rows: list[Row], edits_ok: torch.Tensor) -> torch.Tensor:
        """Start tracking the step's edits in `edits_ok` (a device buffer, reset here to all true)."""
        lo = 0
        for r in rows:
            self.spans[id(r)] = (lo, lo + r.span.n_tokens)
            lo += r.span.n_tokens
        self.edits_ok = edits_ok[:lo]
        self.edits_ok.fill_(True)
        return self.edits_ok


class Runner:
    def __init__(self, model: torch.nn.Module, kv: torch.Tensor, table: SiteTable, block_size: int,
                 device: torch.device, sampled: torch.Tensor,
                 tallies: Optional[torch.Tensor] = None):
        self.model, self.kv, self.table, self.sites = model, kv, table, table.sites
        self.sampled = sampled  # the previous step's sampled ids, on the device (rows with feed_from read them)
        self.edits_ok = torch.ones(len(sampled), dtype=torch.bool, device=device)  # see StepOutput.edits_ok
        self.tallies = tallies  # arrival tallies for the step's kernels (djinn/kernels/tallies.py)
        self.block_size, self.device = block_size, device
        self.parallel = bool(table.always_deferred)
        self.stager = HostStager(device)
        self.graphs: Optional[StepGraphs] = None  # see use_graphs
        self.tp = getattr(model, "tp", None)  # a tensor-parallel model's group (djinn/parallel)

    @torch.inference_mode()
    def use_graphs(self, scratch_block: int, stats: EngineStats, max_context: int, max_tokens: int,
                   capture: bool) -> None:
        """Replay steps from CUDA graphs from now on (cuda_graphs.py), the plain decode steps recorded now;
        `scratch_block`: the KV block that padding and rows outside their sites write into."""
        self.graphs = StepGraphs(self, scratch_block, stats, max_context, max_tokens, capture)
        self.graphs.record_decode_steps()

    @torch.inference_mode()
    def run(self, rows: list[Row]) -> StepOutput:
        """One step of `rows`: replayed from CUDA graphs where they hold it, else eagerly; either way as the
        step's plan (step_plan.py) says."""
        out = StepOutput()
        rows = [r for r in rows if not (r.detail is not None and self._finish_op(r, out))]
        if not rows:
            return out
        graphs = self.graphs
        # the graphs keep only each row's last position of the final norm: rows scoring every one run eagerly
        every_position = any(r.span.n_tokens > 1 and r.request.scores_positions for r in rows)
        if graphs is not None and not every_position and graphs.run_loaded(rows, out):
            return out
        plan = plan_step(rows, self.table)
        if plan.edits:
            out.watch_edits(rows, self.edits_ok)
        if graphs is not None and not every_position and graphs.holds(plan):
            graphs.run(plan, out)
        else:
            self._run_eagerly(plan, out)
        return out

    @torch.inference_mode()
    def record_pending(self) -> bool:
        """With nothing to run: record one graph segment that a step went without (StepGraphs.record_pending);
        returns whether there was one."""
        return self.graphs is not None and self.graphs.record_pending()

    def _run_eagerly(self, plan: StepPlan, out: StepOutput) -> None:
        """Site by site over the rows computing there: a pausing row leaves the batch after its site, a
        resumed row joins it after the site it paused at."""
        live = [i for i, s in enumerate(plan.sites) if s.first == 0]
        entering: dict[int, list[int]] = defaultdict(list)
        for i, s in enumerate(plan.sites):
            if s.first > 0:
                entering[s.first - 1].append(i)
        resid = branch = tokens = ctx = None
        if live:
            ctx, tokens = self._context([plan.rows[i] for i in live])
        for site in self.sites:
            if live:
                before, before_resid = branch, resid
                resid, branch = self.compute_site(site, resid, branch, ctx, tokens, plan.defer_add(site.index))
                met = {}
                if site.index in plan.details:  # the op's input: z for the projection, tokens for the embedding
                    op_input = {"attn_out": before, "embed": tokens}.get(site.op, resid)
                    if site.op == "mlp_out" and self.parallel:  # a parallel MLP reads the block's input
                        op_input = before_resid
                    met = self._details(site, plan, live, op_input, resid, branch, out)
                live, resid, branch, ctx = self._at_site(site, plan, live, resid, branch, ctx, out, met)
            if site.index in entering:
                new = [plan.rows[i] for i in entering[site.index]]
                resid = torch.cat(([resid] if live else []) + [r.resid for r in new])
                if site.kind != RESID:
                    branch = torch.cat(([branch] if live else []) + [self.part(site, r.branch) for r in new])
                for r in new:
                    r.reenter()
                live = live + entering[site.index]
                ctx, _ = self._context([plan.rows[i] for i in live])
        if live:
            finished = [plan.rows[i] for i in live]
            offsets = self._offsets(finished)
            for r, lo, hi in zip(finished, offsets, offsets[1:]):
                if hi - lo > 1 and r.request.scores_positions:
                    out.normed[id(r)] = branch[lo:hi]
            last = to_device(torch.tensor(offsets[1:]) - 1, self.device)
            out.logits = self.model.unembed(branch[last])
            out.finished = finished

    @torch.inference_mode()
    def load_ahead(self, rows: list[Row]) -> None:
        """Get the step of `rows` ready to launch (graphs captured, inputs on the device) while the host
        would otherwise wait; a later `run` of the same rows in the same state then only launches it."""
        if self.graphs is not None:
            self.graphs.load_ahead(rows)

    # ------------------------------------------------------------------ helpers

    def whole(self, site: Site, value: torch.Tensor) -> torch.Tensor:
        """The site's value as clients see it: where tensor-parallel ranks each hold a part, gathered."""
        return value if self.tp is None or not sharded(site) else gather(value, self.tp)

    def part(self, site: Site, value: torch.Tensor) -> torch.Tensor:
        """What this rank computes with of a whole value at the site (all of it but in tensor parallelism)."""
        return value if self.tp is None or not sharded(site) else split(value, self.tp)

    def _op_input(self, site: Site, value: torch.Tensor, whole: bool) -> torch.Tensor:
        """An op's input, whole or this rank's part: only the output projection's (z) is ever split."""
        if site.op != "attn_out":
            return value
        z = self.sites[site.index - 1]
        return self.whole(z, value) if whole else self.part(z, value)

    def take(self, out: StepOutput, row: Row, probe: Probe, value: torch.Tensor) -> None:
        """A capture of the row's `value` at the probe's site, on its way to the host: the value itself, or
        for a logit lens its top-k (reduced here, on the device)."""
        if probe.lens is None:
            out.captures.append((row, probe.name, self.stager.stage(value)))
            return
        top = apply_lens(self.model, probe.lens, value, row.span.start, self.stager)
        if top is not None:
            out.lenses.append((row, probe.name, top))

    def _take_all(self, out: StepOutput, taking: list[tuple[Row, Probe, int, int]], value: torch.Tensor) -> None:
        """The captures of several rows at one site: the plain ones leave the GPU in one copy of the tokens
        they span (many rows capturing alike, as in a run of many prompts, cost one copy, not one each)."""
        plain = [t for t in taking if t[1].lens is None]
        if len(plain) < 2:
            plain = []
        for r, probe, lo, hi in taking:
            if not (plain and probe.lens is None):
                self.take(out, r, probe, value[lo:hi])
        if plain:
            first, end = min(t[2] for t in plain), max(t[3] for t in plain)
            staged = self.stager.stage(value[first:end])
            for r, probe, lo, hi in plain:
                out.captures.append((r, probe.name, StagedPart(staged, slice(lo - first, hi - first))))

    def _context(self, rows: list[Row]) -> tuple[ForwardContext, torch.Tensor]:
        tokens = [t for r in rows for t in r.tokens]
        offsets = self._offsets(rows)
        feed = [(offsets[i], r.feed_from) for i, r in enumerate(rows) if r.feed_from is not None]
        ctx, tok = build_context([r.span for r in rows], tokens, self.kv, self.block_size, self.device,
                                 feed=feed, sampled=self.sampled, tallies=self.tallies)
        self.model.prepare(ctx)
        return ctx, tok

    @staticmethod
    def _offsets(rows: list[Row]) -> list[int]:
        offsets = [0]
        for r in rows:
            offsets.append(offsets[-1] + r.span.n_tokens)
        return offsets

    def compute_site(self, site: Site, resid, branch, ctx: ForwardContext, tokens, defer_add: bool = False):
        """The (residual, branch) state at `site`, from the state at the site before it. With `defer_add` a
        residual add leaves the state as (resid, branch): the next site's norm does the add in its kernel.
        Only a site where nothing reads or edits the residual may be deferred."""
        m = self.model
        if site.op == "embed":
            return m.embed_tokens(tokens, ctx.positions), None
        if site.op == "attn_z":
            return m.blocks[site.layer].attn_z(resid, ctx, branch)
        if site.op == "attn_out":
            return resid, m.blocks[site.layer].attn_out(branch)
        if site.op == "add":
            defer_add = defer_add or site.index in self.table.always_deferred
            return (resid, branch) if defer_add else (resid + branch, None)
        if site.op == "mlp_out":
            return m.blocks[site.layer].mlp_out(resid, branch)
        if site.op == "final_norm":
            return m.ln_final.add_and_norm(resid, branch)
        raise AssertionError(site.op)

    def _at_site(self, site: Site, plan: StepPlan, live: list[int], resid, branch, ctx, out: StepOutput,
                 met: dict[int, torch.Tensor]):
        """The plan's work at `site` for the live rows (indices into plan.rows): edits, captures, pauses (`met`:
        the values of pauses at detail sites inside the op, by live row)."""
        value = resid if site.kind == RESID else branch
        rows = [plan.rows[i] for i in live]
        offsets = self._offsets(rows)
        per_row = plan.edits.get(site.index)
        edits = [] if per_row is None else [(k, per_row[i]) for k, i in enumerate(live) if per_row[i]]
        taking = [(rows[k], probe, offsets[k], offsets[k + 1]) for k, i in enumerate(live)
                  for at, probe in plan.sites[i].captures if at == site.index]
        pausing = any(plan.sites[i].pause is not None and plan.sites[i].last == site.index for i in live)
        # edits, captures and pauses see the value whole; a tensor-parallel rank goes on with its part of it
        shown = self.whole(site, value) if edits or taking or pausing else value
        if edits:
            self._apply_edits(shown, rows, offsets, edits, out)
        if shown is not value:
            value = branch = self.part(site, shown)
        leaving: list[int] = []
        if taking:
            self._take_all(out, taking, shown)
        for k, i in enumerate(live):
            r, s, lo, hi = rows[k], plan.sites[i], offsets[k], offsets[k + 1]
            if s.pause is not None and s.last == site.index:
                act = shown[lo:hi] if s.pause.site == site.index else met[k]  # met: a detail site's value
                kept = branch if site.kind == RESID else shown
                out.paused.append(r.pause_here(s.pause, site.index, resid, kept, act, lo, hi))
                leaving.append(k)
            elif s.last == site.index != len(self.sites) - 1:
                out.stopped.append(r)
                leaving.append(k)
        if not leaving:
            return live, resid, branch, ctx
        keep = [k for k in range(len(live)) if k not in leaving]
        live = [live[k] for k in keep]
        if not live:
            return [], None, None, None
        idx = to_device(torch.cat([torch.arange(offsets[k], offsets[k + 1]) for k in keep]), self.device)
        resid = resid.index_select(0, idx)
        branch = branch.index_select(0, idx) if branch is not None else None
        ctx, _ = self._context([plan.rows[i] for i in live])
        return live, resid, branch, ctx

    # ------------------------------------------------------------------ the detailed path (detail.py)

    def _details(self, site: Site, plan: StepPlan, live: list[int], op_input: torch.Tensor, resid, branch,
                 out: StepOutput) -> dict[int, torch.Tensor]:
        """Each live row's work inside the op of chain site `site`: a row that edits there takes the detailed
        output; the others keep the fast path's. Returns the values of the pauses met, by live row."""
        rows = [plan.rows[i] for i in live]
        offsets = self._offsets(rows)
        met = {}
        for k, i in enumerate(live):
            work = plan.sites[i].details.get(site.index)
            if work is None:
                continue
            lo, hi = offsets[k], offsets[k + 1]
            new, paused = self.work_inside(site, rows[k], op_input[lo:hi], work, out)
            if new is not None:
                (resid if site.kind == RESID else branch)[lo:hi] = new
            if paused is not None:
                met[k] = paused
        return met

    def work_inside(self, site: Site, r: Row, op_input: torch.Tensor, work: OpDetail, out: StepOutput
                    ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """One row's work inside the op of chain site `site` (either executor's): its captures staged, and
        (the op's detailed output if the row edits inside it, else None; the value of a pause met there, else
        None). A pausing row keeps what finishing its op after the resume needs."""
        run = DetailRun(self.table, site.index, r, work, lambda row, probe, v: self.take(out, row, probe, v),
                        tp=self.tp)
        edited = edits_inside(work)
        new = self._detailed_op(site, r, op_input, run, write=edited)
        if run.paused is None:
            return (new if edited else None), None
        probe, value = run.paused
        r.detail = DetailPause(probe.site, self._op_input(site, op_input, whole=True).clone())
        return (new if edited else None), present(self.table[probe.site], value)

    def _detailed_op(self, site: Site, r: Row, op_input: torch.Tensor, run: DetailRun, write: bool) -> torch.Tensor:
        """The op of chain site `site` for row `r` on the detailed path (`write`: store its keys and values)."""
        m = self.model
        if site.op == "embed":
            positions = torch.arange(r.span.start, r.span.start + r.span.n_tokens, device=self.device)
            return m.embed_detailed(op_input, positions, run)
        if site.op == "final_norm":
            return m.ln_final.detailed(op_input, run, "ln_final")
        block = m.blocks[site.layer]
        if site.op == "attn_z":
            window, rope = m.cfg.window(site.layer), m.rope_for(site.layer)
            return block.attn_z_detailed(op_input, self.kv, row_kv(r, self.block_size, window, write, rope,
                                                                   self.device), run)
        if site.op == "attn_out":
            return block.attn_out_detailed(op_input, run)
        if site.op == "mlp_out":
            return block.mlp_out_detailed(op_input, run)
        raise AssertionError(site.op)

    def _finish_op(self, r: Row, out: StepOutput) -> bool:
        """A row resumed after a pause at a detail site: finish its op from there (with the client's value,
        if it sent one), taking the captures after the pause site, or pausing again at a later breakpoint
        inside the op. Returns whether it paused again (it then leaves this step)."""
        d, plan, step = r.detail, r.plan, r.step
        host = self.table[d.site].host
        site, after = self.table[host], self.table.order(self.table[d.site])
        later = [k for k in plan.breakpoints if self.table[k].host == host and self.table.order(self.table[k]) > after]
        pause = next((p for k in sorted(later, key=lambda k: self.table.order(self.table[k]))
                      for p in plan.breakpoints[k] if p.applies(step)), None)
        stop = self.table.order(self.table[pause.site]) if pause is not None else None
        work = OpDetail(pause=pause)
        chain_captures = []
        for k, probes in plan.captures.items():
            s = self.table[k]
            if s.host == host and (stop is None or self.table.order(s) <= stop):
                for p in probes:
                    if p.applies(step):
                        (chain_captures if s.index == host else work.captures).append((k, p))
        for k, es in plan.edits.items():
            if self.table[k].host == host and k != host:
                mine = [e for e in es if e.reaches(step, r.positions)]
                if mine:
                    work.edits[k] = mine
        changed = d.replacement is not None
        if changed or work.captures or pause is not None:
            run = DetailRun(self.table, host, r, work, lambda row, probe, v: self.take(out, row, probe, v),
                            skip_before=d.site, replacement=d.replacement, tp=self.tp)
            new = self._detailed_op(site, r, self._op_input(site, d.op_input, whole=False), run, write=changed)
            if changed:  # the op's output follows the client's value, then the edits at the op's own site
                new = self.whole(site, new)
                chain_edits = [e for e in plan.edits.get(host, []) if e.reaches(step, r.positions)]
                if chain_edits:
                    new = edit_row(new, chain_edits, r)
                if not torch.isfinite(new).all():
                    raise NonFinite(f"the value resumed at {self.table[d.site].name} made {site.name} NaN or Inf "
                                    f"in step {step}")
                if site.kind == RESID:
                    r.resid = new
                else:
                    r.branch = new
            if run.paused is not None:
                probe, value = run.paused
                r.detail = DetailPause(probe.site, d.op_input)
                out.paused.append(Pause(r, probe.name, present(self.table[probe.site], value)))
                return True
        value = r.resid if site.kind == RESID else r.branch
        for _, p in chain_captures:
            self.take(out, r, p, value)
        r.detail = None
        return False

    def _apply_edits(self, value: torch.Tensor, live: list[Row], offsets: list[int],
                     edits: list[tuple[int, list[Edit]]], out: StepOutput) -> None:
        """Each row's edits at this site fold into one per-token `act * mul + add` in float32, applied to all
        edited rows in one batched op and rounded to the model's dtype once: the same arithmetic as the CUDA
        graphs, so both paths agree bit for bit. Tokens whose edited value is not finite are marked in
        `out.edits_ok`."""
        index, home, muls, adds = [], [], [], []
        for i, es in edits:
            r = live[i]
            mul, add = fold_edits(es, r.span.start, r.span.n_tokens, value.shape[1:], value.device)
            index.append(torch.arange(offsets[i], offsets[i + 1]))
            home.append(torch.arange(*out.spans[id(r)]))
            muls.append(mul)
            adds.append(add)
        index, home = to_device(torch.cat(index), self.device), to_device(torch.cat(home), self.device)
        new = (value.index_select(0, index).float() * torch.cat(muls) + torch.cat(adds)).to(value.dtype)
        value.index_copy_(0, index, new)
        out.edits_ok[home] &= torch.isfinite(new).flatten(1).all(1)

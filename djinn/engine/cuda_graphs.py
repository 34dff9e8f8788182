"""CUDA graphs of decode steps, cut into segments where the host has to act.

A step whose rows each feed one token replays graphs captured per (first site, last site, padded batch
size, edited sites). With no breakpoint, capture or resumed row due, that is one graph of the whole forward.
Otherwise the forward is cut after every site where a row pauses, is captured, or re-enters (a resumed
row): each segment reads and writes the residual stream (and the branch value) in static buffers, and
between two segments the host takes out the pausing rows' state, stages the captures and puts the
re-entering rows' saved state in its slots. Each row keeps its slot for the whole step; outside its own
sites (before it re-enters, after it pauses) its slot computes values nobody reads and writes its keys and
values into a scratch block, so nothing it wrote before is overwritten. A pause therefore costs the rest of
the batch nothing but a cut: every row computes with the same kernels and batch shape as in a step
without it.

Interventions stay data: each edited site has preallocated per-row `mul` and `add` buffers (identity for
rows without an edit), and the graph computes `act * mul + add` there, in float32 like the eager path.
Steps with a prompt (several tokens in a row) run eagerly through the same model code.

Without a GPU the same path runs with nothing captured (`capture=False`): the tests check its bookkeeping
against the eager runner on the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..models.attention import AttentionMetadata
from ..models.context import ForwardContext
from ..sites import RESID
from .batch import portable_layout, to_device
from .plan import Edit, Probe

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass
class RowSites:
    """The sites one row computes in this step: first..last, pausing at `last` if `pause` is set."""

    first: int  # 0: from the embedding; else the site after the one it paused at
    last: int
    pause: Optional[Probe]
    captures: list[tuple[int, Probe]] = field(default_factory=list)


@dataclass
class StepPlan:
    rows: list  # the step's rows (runner.Row)
    sites: list[RowSites]
    edits: dict[int, list[list[Edit]]]  # site -> each row's edits there
    cuts: list[int]  # sites after which the forward is cut, ascending

    def segments(self, final: int) -> list[tuple[int, int]]:
        """(first, last) site of each segment; the last one ends the forward (after a cut at the final site
        it holds no site, only the unembedding)."""
        starts = [0] + [c + 1 for c in self.cuts]
        return list(zip(starts, self.cuts + [final]))


class StepGraphs:
    def __init__(self, runner, scratch_block: int, max_context: int = 4096, capture: bool = True):
        self.runner, self.capture = runner, capture
        self.model, self.kv, self.sites, self.device = runner.model, runner.kv, runner.sites, runner.device
        self.final = len(self.sites) - 1
        self.block_size = runner.block_size
        self.scratch_block = scratch_block
        self.max_batch = BUCKETS[-1]
        self.width = -(-max_context // self.block_size)  # block-table columns a graph can read
        mb, w = self.max_batch, self.width
        # One host buffer and one device buffer hold every integer input, so a step is one copy. The host
        # runs a step ahead of the GPU, so two host buffers take turns, each reused only once its last copy
        # has left (the event recorded after it).
        pinned = capture
        self._hosts = [torch.zeros(8 * mb + mb * w, dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        self._copied: list[Optional[torch.cuda.Event]] = [None, None]
        self._dev = torch.zeros_like(self._hosts[0], device=self.device)
        self.tokens, self.positions = self._dev[:mb], self._dev[mb:2 * mb]
        self.write_blocks, self.write_offsets = self._dev[2 * mb:3 * mb], self._dev[3 * mb:4 * mb]
        self.feed_from = self._dev[4 * mb:5 * mb]  # index into the previous step's sampled ids, -1: use `tokens`
        self.own_blocks = self._dev[5 * mb:6 * mb]  # each row's real write block (write_blocks may point at scratch)
        self.row_first, self.row_last = self._dev[6 * mb:7 * mb], self._dev[7 * mb:8 * mb]
        self.tables = self._dev[8 * mb:].view(mb, w)
        self.token_row = torch.arange(mb, device=self.device)
        # the state between segments: the residual stream, and the branch value after a branch site
        cfg, dtype = self.model.cfg, runner.kv.dtype
        self.resid = torch.zeros(mb, cfg.d_model, dtype=dtype, device=self.device)
        self.branch = {False: torch.zeros(mb, cfg.d_model, dtype=dtype, device=self.device),
                       True: torch.zeros(mb, cfg.n_heads, cfg.d_head, dtype=dtype, device=self.device)}
        self._edit_bufs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._filled: dict[int, object] = {}  # what each site's buffers hold now
        self._graphs: dict[tuple, Callable[[], Optional[torch.Tensor]]] = {}
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        self.window = runner.window or 0
        self._ctx: Optional[ForwardContext] = None  # without capture: this step's attention layout

    # ------------------------------------------------------------------ eligibility

    def plan_step(self, rows) -> Optional[StepPlan]:
        """What each row computes, its edits, and where the forward is cut; None if the step must run eagerly."""
        if not rows or len(rows) > self.max_batch:
            return None
        sites, edits, cuts = [], {}, set()
        for i, r in enumerate(rows):
            if r.span.n_tokens != 1 or len(r.span.block_table) > self.width:
                return None
            plan, step, pos = r.plan, r.step, r.span.start
            first, last, pause = r.entry + 1, self.final, None
            for s in sorted(k for k in plan.breakpoints if k >= first):
                pause = next((p for p in plan.breakpoints[s] if p.applies(step)), None)
                if pause is not None:
                    last = s
                    break
            captures = [(s, p) for s in sorted(plan.captures) if first <= s <= last
                        for p in plan.captures[s] if p.applies(step)]
            for s, es in plan.edits.items():
                if first <= s <= last:
                    for e in es:
                        if e.applies(step) and (e.positions is None or pos in e.positions):
                            edits.setdefault(s, [[] for _ in rows])[i].append(e)
            sites.append(RowSites(first, last, pause, captures))
            if first > 0:
                cuts.add(first - 1)
            if pause is not None:
                cuts.add(last)
            cuts.update(s for s, _ in captures)
        return StepPlan(rows, sites, edits, sorted(cuts))

    # ------------------------------------------------------------------ replay

    def run(self, plan: StepPlan, out) -> None:
        """Replay the step's segments; fills `out` (a runner.StepOutput) with pauses, captures and logits."""
        rows, n = plan.rows, len(plan.rows)
        bucket = next(b for b in BUCKETS if b >= n)
        segments = plan.segments(self.final)
        keys = [(bucket, a, b, j == len(segments) - 1, tuple(s for s in sorted(plan.edits) if a <= s <= b))
                for j, (a, b) in enumerate(segments)]
        for key in keys:  # before this step's inputs go in: capturing runs the graph's forward
            if key not in self._graphs:
                self._graphs[key] = self._record(*key)
        self._load_inputs(plan, bucket)
        for site in sorted(plan.edits):
            self._load_edits(site, plan, bucket)
        cut = len(segments) > 1
        logits = None
        for j, ((a, b), key) in enumerate(zip(segments, keys)):
            if cut:  # rows write their keys and values only inside their own sites
                active = (self.row_first[:bucket] <= a) & (self.row_last[:bucket] >= b)
                self.write_blocks[:bucket].copy_(torch.where(active, self.own_blocks[:bucket], self.scratch_block))
            logits = self._graphs[key]()
            if j < len(plan.cuts):
                self._at_cut(b, plan, out)
        done = [i for i, s in enumerate(plan.sites) if s.pause is None]
        if len(done) == n:
            out.finished, out.logits = rows, logits[:n]
        elif done:
            out.finished = [rows[i] for i in done]
            out.logits = logits.index_select(0, to_device(torch.tensor(done), self.device))

    def _at_cut(self, site_index: int, plan: StepPlan, out) -> None:
        """After `site_index`: stage captures, take out the rows pausing here, put in those re-entering after it."""
        from .runner import Pause

        site = self.sites[site_index]
        resid, branch = self._state(site_index)
        value = resid if site.kind == RESID else branch
        for i, (r, s) in enumerate(zip(plan.rows, plan.sites)):
            for at, probe in s.captures:
                if at == site_index:  # a copy first: the buffers change with the next segment
                    out.captures.append((r, probe.name, self.runner.stager.stage(value[i:i + 1].clone())))
            if s.pause is not None and s.last == site_index:
                r.resid = resid[i:i + 1].clone()
                r.branch = branch[i:i + 1].clone() if branch is not None else None
                r.entry = site_index
                out.paused.append(Pause(r, s.pause.name, value[i:i + 1].clone()))
            elif s.first == site_index + 1:
                resid[i:i + 1].copy_(r.resid)
                if branch is not None:
                    branch[i:i + 1].copy_(r.branch)
                r.resid = r.branch = None
                r.entry = -1

    def _state(self, site_index: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The static buffers that hold the state after `site_index` (its branch value only after a branch site)."""
        site = self.sites[site_index]
        return self.resid, (None if site.kind == RESID else self.branch[site.per_head])

    def _load_inputs(self, plan: StepPlan, bucket: int) -> None:
        mb, w, bs = self.max_batch, self.width, self.block_size
        self._hosts.reverse()
        self._copied.reverse()
        if self._copied[0] is not None:
            self._copied[0].synchronize()
        host = self._hosts[0].numpy()  # numpy view: per-row Python writes here cost far less than tensor ops
        host[: 8 * mb] = 0
        host[2 * mb:3 * mb] = self.scratch_block  # padding rows write into the scratch block
        host[5 * mb:6 * mb] = self.scratch_block
        host[4 * mb:5 * mb] = -1
        host[7 * mb:8 * mb] = self.final
        tables = host[8 * mb:].reshape(mb, w)
        tables[:bucket] = self.scratch_block
        for i, (r, s) in enumerate(zip(plan.rows, plan.sites)):
            pos, bt = r.span.start, r.span.block_table
            block = bt[pos // bs]
            host[mb + i], host[3 * mb + i], host[5 * mb + i] = pos, pos % bs, block
            host[6 * mb + i], host[7 * mb + i] = s.first, s.last
            if s.first == 0:
                host[i], host[2 * mb + i] = r.tokens[0], block
                if r.feed_from is not None:
                    host[4 * mb + i] = r.feed_from
            tables[i, : len(bt)] = bt
        used = 8 * mb + bucket * w
        self._dev[:used].copy_(self._hosts[0][:used], non_blocking=True)
        if self.capture:
            self._copied[0] = torch.cuda.Event()
            self._copied[0].record()
        else:  # the portable attention path reads a padded layout of this step's inputs
            ctx = self._static_context(bucket)
            positions = self.positions[:bucket]
            ctx.attention.max_context = int(positions.max()) + 1
            portable_layout(ctx.attention, positions, torch.ones_like(positions), self.tables[:bucket],
                            self.block_size, self.runner.window, self.device)
            self._ctx = ctx

    def _load_edits(self, site: int, plan: StepPlan, bucket: int) -> None:
        per_row = plan.edits[site]
        # Edits without positions or steps give the same buffers every step: refill only on change.
        key = (bucket, tuple(tuple(e.uid for e in es) for es in per_row))
        invariant = all(e.positions is None and e.steps is None for es in per_row for e in es)
        if not (invariant and self._filled.get(site) == key):
            self._fill_edits(site, per_row, [r.span.start for r in plan.rows], bucket)
            self._filled[site] = key if invariant else None

    def _fill_edits(self, site: int, per_row: list[list[Edit]], positions: list[int], bucket: int) -> None:
        """Compose each row's edits in order into one (mul, add): (x * m1 + a1) * m2 + a2, a replacement
        being mul 0, add the new value; then write all rows with one indexed copy per buffer."""
        mul, add = self._buffers(site)
        mul[:bucket].fill_(1)
        add[:bucket].zero_()
        token_dims = add.dim() - 1
        mul_rows, mul_vals, add_rows, add_vals = [], [], [], []
        for i, es in enumerate(per_row):
            m = a = None
            for e in es:
                k = None if e.positions is None else e.positions.index(positions[i])

                def at(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
                    return t[k] if t is not None and k is not None and t.dim() == token_dims + 1 else t
                if e.replace is not None:
                    m, a = torch.zeros_like(add[0]), at(e.replace)
                    continue
                if e.mul is not None:
                    m = at(e.mul) if m is None else m * at(e.mul)
                    a = None if a is None else a * at(e.mul)
                if e.add is not None:
                    a = at(e.add) if a is None else a + at(e.add)
            if m is not None:
                mul_rows.append(i)
                mul_vals.append(m.expand(add.shape[1:]))
            if a is not None:
                add_rows.append(i)
                add_vals.append(a.expand(add.shape[1:]))
        if mul_rows:
            mul.index_copy_(0, to_device(torch.tensor(mul_rows), self.device), torch.stack(mul_vals))
        if add_rows:
            add.index_copy_(0, to_device(torch.tensor(add_rows), self.device), torch.stack(add_vals))

    def _buffers(self, site: int) -> tuple[torch.Tensor, torch.Tensor]:
        if site not in self._edit_bufs:
            s = self.sites[site]
            cfg = self.model.cfg
            shape = (cfg.n_heads, cfg.d_head) if s.per_head else (cfg.d_model,)
            self._edit_bufs[site] = (torch.ones((self.max_batch, *shape), device=self.device),
                                     torch.zeros((self.max_batch, *shape), device=self.device))
        return self._edit_bufs[site]

    # ------------------------------------------------------------------ the segments' forward

    def _static_context(self, bucket: int) -> ForwardContext:
        meta = AttentionMetadata(
            write_blocks=self.write_blocks[:bucket], write_offsets=self.write_offsets[:bucket],
            block_tables=self.tables[:bucket], token_row=self.token_row[:bucket],
            token_pos=self.positions[:bucket], window=self.window, max_context=self.width * self.block_size)
        return ForwardContext(positions=self.positions[:bucket], attention=meta, kv=self.kv)

    def _forward(self, bucket: int, first: int, last: int, ends: bool,
                 signature: tuple[int, ...]) -> Optional[torch.Tensor]:
        """Sites first..last on the static state; then the logits if the segment `ends` the forward, else
        the new state in the static buffers."""
        ctx = self._static_context(bucket) if self.capture else self._ctx
        self.model.prepare(ctx)
        tokens = None
        if first == 0:
            src = self.feed_from[:bucket]
            tokens = torch.where(src < 0, self.tokens[:bucket], self.runner.sampled[src.clamp(min=0)])
            resid = branch = None
        else:
            resid, branch = self._state(first - 1)
            resid, branch = resid[:bucket], (None if branch is None else branch[:bucket])
        for site in self.sites[first:last + 1]:
            deferrable = site.index not in signature and site.index != last
            resid, branch = self.runner.compute_site(site, resid, branch, ctx, tokens, deferrable)
            if site.index in signature:
                mul, add = self._edit_bufs[site.index]
                value = resid if site.kind == RESID else branch
                value.copy_(value.float() * mul[:bucket] + add[:bucket])  # as the eager path computes it
        if ends:
            return self.model.unembed(branch)
        out_resid, out_branch = self._state(last)
        out_resid[:bucket].copy_(resid)
        if out_branch is not None:
            out_branch[:bucket].copy_(branch)
        return None

    def _record(self, bucket: int, first: int, last: int, ends: bool, signature: tuple[int, ...]):
        """A replayable segment: a captured CUDA graph, or (without capture) the forward itself."""
        for site in signature:
            self._buffers(site)
        if not self.capture:
            return lambda: self._forward(bucket, first, last, ends, signature)
        # warm-up and capture run the forward for real: their key and value writes must go nowhere
        self.write_blocks.fill_(self.scratch_block)
        self.tables.fill_(self.scratch_block)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(bucket, first, last, ends, signature)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._forward(bucket, first, last, ends, signature)

        def replay() -> Optional[torch.Tensor]:
            graph.replay()
            return logits
        return replay

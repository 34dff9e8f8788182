"""CUDA graphs of engine steps: the graph executor of a step's plan (step_plan.py), cut into segments where
the host has to act.

A step replays graphs captured per SegmentKey (first site, last site, padded token count, padded row count,
edited sites): decode steps (one token a row) and steps with prompts alike, up to a token count whose attention
scratch stays small. With no breakpoint, capture or resumed row due, that is one graph of the whole forward.
Otherwise the forward is cut after every site where a row pauses, is captured, or re-enters (a resumed
row): each segment reads and writes the residual stream (and the branch value) in static buffers, and
between two segments the host takes out the pausing rows' state, stages the captures and puts the
re-entering rows' saved state in its slots. Each row keeps its slot for the whole step; outside its own
sites (before it re-enters, after it pauses) its slot computes values nobody reads and writes its keys and
values into a scratch block, so nothing it wrote before is overwritten; a segment no row computes for is
not replayed at all. A pause therefore costs the rest of the batch nothing but a cut: every row computes
with the same kernels and batch shape as in a step without it. Padding tokens form one extra row of their
own, over the scratch block.

Work inside an op (detail.py: norm scales, q/k/v, patterns, neurons) is done by the host at a cut after
the op's chain site, for the rows that asked, on the op's input and output left in the static buffers; a
row that edits there writes the detailed output back before the next segment. The other rows' values are
the same bits as in a step without it. A decode step in which rows only read attention scores or patterns
needs no cut: the attention kernel keeps the scores of those rows' tokens (up to SCORE_SLOTS of them) in a
static buffer, over their whole history, and the host takes every layer's at once after the replay; the
other rows pay a load of their slot and a branch.

Interventions stay data: each edited site has preallocated per-token `mul` and `add` buffers (identity
where no edit applies), and the graph computes `act * mul + add` there, in float32 like the eager path.
Longer steps run eagerly through the same model code. A step with prompts whose segments are not recorded
yet runs their forward uncaptured (the kernels a replay would launch, with the same bits), and they are
recorded when the engine is idle (record_pending).

Without a GPU the same path runs with nothing captured (`capture=False`): the tests check its bookkeeping
against the eager runner on the CPU.
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from ..models.attention import AttentionMetadata
from ..models.context import ForwardContext
from ..sites import RESID
from .batch import portable_layout, to_device
from .detail import edit_row
from .plan import Edit, fold_edits
from .step_plan import StepPlan, plan_step, segments
from .staging import StagedPart
from .stats import EngineStats

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)  # padded row counts
TOKEN_BUCKETS = BUCKETS + (256, 384, 512, 768, 1024, 1536, 2048)  # padded token counts
ATTENTION_SCRATCH_BYTES = 1 << 30  # the largest attention partials buffer a graph may hold
SCORE_SLOTS = 4  # rows of a step replayed from graphs that may read scores or patterns
SCORE_SITES = ("attn.hook_attn_scores", "attn.hook_pattern")  # the detail sites the kernel's scores give


def bucket_of(n: int, buckets: tuple[int, ...]) -> int:
    return next(b for b in buckets if b >= n)


@dataclass(frozen=True)
class SegmentKey:
    """What one recorded segment computes: sites first..last for `tokens` padded tokens; `rows` padded rows
    when the step holds prompts (None: a decode step, one token a row, every token its row's last); whether
    it `ends` the forward (then it returns the logits); the sites it edits."""

    tokens: int
    rows: Optional[int]
    first: int
    last: int
    ends: bool
    edited: tuple[int, ...]


@dataclass
class Replay:
    """A step's plan made ready to replay: its padded token count, its cuts, each segment's key and whether
    any row computes in it (a segment none does is skipped), and whether the kernel keeps the scores the
    step's rows read inside ops (else the host does their work inside ops at cuts)."""

    plan: StepPlan
    tokens: int
    cuts: list[int]
    keys: list[SegmentKey]
    needed: list[bool]
    kept_scores: bool


class StepGraphs:
    def __init__(self, runner, scratch_block: int, stats: EngineStats, max_context: int = 4096,
                 max_tokens: int = TOKEN_BUCKETS[-1], capture: bool = True):
        self.runner, self.capture, self.stats = runner, capture, stats
        self.model, self.kv, self.sites, self.device = runner.model, runner.kv, runner.sites, runner.device
        self.final = len(self.sites) - 1
        self.block_size = runner.block_size
        self.scratch_block = scratch_block
        self.max_rows = BUCKETS[-1]
        self.width = -(-max_context // self.block_size)  # block-table columns a graph can read
        cfg = self.model.cfg
        tp = runner.tp  # a tensor-parallel rank computes its share of the heads
        self.heads = cfg.n_heads // (tp.world if tp is not None else 1)
        per_token = 0
        if capture:  # the Triton attention's partial results grow with tokens x context: they cap the tokens
            from ..kernels.paged_attention import partials_bytes

            per_token = partials_bytes(1, self.heads, cfg.d_head, self.width * self.block_size)
        self.token_buckets = tuple(b for b in TOKEN_BUCKETS if b <= BUCKETS[-1] or (
            b <= max_tokens and b * per_token <= ATTENTION_SCRATCH_BYTES))
        mt, mr, w = self.token_buckets[-1], self.max_rows, self.width
        # One host buffer and one device buffer hold every integer input, so a step is one copy. The host
        # runs a step ahead of the GPU, so two host buffers take turns, each reused only once its last copy
        # has left (the event recorded after it). Per token: 8 arrays; per row: the last token's index and
        # the block table, after table row 0, all scratch, which the padding tokens use. A step copies the
        # prefix it uses.
        self._layout = {name: (k * mt, (k + 1) * mt) for k, name in enumerate(
            ["tokens", "positions", "write_offsets", "feed_from", "own_blocks", "first", "last", "token_row",
             "score_slot"])}
        self._layout["last_token"] = (9 * mt, 9 * mt + mr)
        self._layout["tables"] = (9 * mt + mr, 9 * mt + mr + (mr + 1) * w)
        size = self._layout["tables"][1]
        self._hosts = [torch.zeros(size, dtype=torch.long, pin_memory=capture) for _ in range(2)]
        # numpy views of each host buffer's fields: slice writes there cost far less than tensor ops
        self._host_fields = [{name: self._field(h.numpy(), name) for name in self._layout} for h in self._hosts]
        for f in self._host_fields:
            f["tables"][:w] = scratch_block  # table row 0, the padding tokens' row: all scratch, for good
        self._tables_written: list[dict[int, tuple]] = [{}, {}]
        self._copied: list[Optional[torch.cuda.Event]] = [None, None]
        self._dev = torch.zeros_like(self._hosts[0], device=self.device)
        self.tokens, self.positions = self._field(self._dev, "tokens"), self._field(self._dev, "positions")
        self.write_offsets = self._field(self._dev, "write_offsets")
        self.feed_from = self._field(self._dev, "feed_from")  # index into the previous step's sampled ids, -1: none
        self.own_blocks = self._field(self._dev, "own_blocks")  # each token's write block (padding: scratch)
        self.row_first, self.row_last = self._field(self._dev, "first"), self._field(self._dev, "last")
        self.token_row, self.last_token = self._field(self._dev, "token_row"), self._field(self._dev, "last_token")
        self.tables = self._field(self._dev, "tables").view(mr + 1, w)
        self.score_slot = self._field(self._dev, "score_slot")  # the token's row of `scores`, -1: none
        self.scores = torch.full((SCORE_SLOTS, cfg.n_layers, cfg.n_heads, self.width * self.block_size),
                                 float("-inf"), device=self.device)
        # the state between segments: the residual stream, and the branch value after a branch site
        dtype = runner.kv.dtype
        self.resid = torch.zeros(mt, cfg.d_model, dtype=dtype, device=self.device)
        self.branch = {False: torch.zeros(mt, cfg.d_model, dtype=dtype, device=self.device),
                       True: torch.zeros(mt, self.heads, cfg.d_head, dtype=dtype, device=self.device)}
        self._edit_bufs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._filled: dict[int, object] = {}  # what each site's buffers hold now
        self._graphs: dict[SegmentKey, Callable[[], Optional[torch.Tensor]]] = {}
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        # the shortest sliding window of any layer (0: none): kept scores before a window's start stay unwritten
        self.window = min((w for w in map(cfg.window, range(cfg.n_layers)) if w), default=0)
        self._ctx: Optional[ForwardContext] = None  # without capture: this step's attention layout
        self._block_inputs: dict[int, torch.Tensor] = {}  # a parallel MLP's input, kept for work inside it
        self._ahead: Optional[tuple] = None  # (rows' identity, their plans, Replay): loaded early
        # A step with prompts whose segments are not recorded yet runs their forward uncaptured, on the same
        # static buffers (no step waits for the capture of a batch shape that may never come back); they are
        # recorded when the engine is idle (record_pending). A decode step's are recorded when first met:
        # the steps after it replay them.
        self.record_later = capture
        self._pending: dict[SegmentKey, None] = {}

    def forget_inputs(self) -> None:
        """After a failed step: trust nothing the device buffers hold (edits, inputs loaded ahead)."""
        self._filled.clear()
        self._ahead = None

    def _field(self, buf, name: str):
        lo, hi = self._layout[name]
        return buf[lo:hi]

    # ------------------------------------------------------------------ replay

    def keeps_scores(self, plan: StepPlan) -> bool:
        """Whether the graphs can serve the step's work inside ops: a decode step whose rows only read scores
        or patterns there, at most SCORE_SLOTS of them."""
        if not plan.decode or self.runner.tp is not None:  # a rank's kernel keeps only its own heads' scores
            return False
        inside = [s for s in plan.sites if s.details]
        return (len(inside) <= SCORE_SLOTS and all(r.detail is None for r in plan.rows)
                and all(self._kept_scores(s) is not None for s in inside))

    def _kept_scores(self, s) -> Optional[list]:
        """A row's captures inside ops as (site, probe), if they are all of scores or patterns (else None)."""
        if "scores" not in s.memo:
            table = self.runner.table
            wanted = [(table[at], probe) for w in s.details.values() for at, probe in w.captures]
            only = all(w.pause is None and not any(w.edits.values()) for w in s.details.values()) and all(
                site.local in SCORE_SITES for site, _ in wanted)
            s.memo["scores"] = wanted if only else None
        return s.memo["scores"]

    def holds(self, plan: StepPlan) -> bool:
        """Whether the graphs can run the step (else it runs eagerly)."""
        return (0 < len(plan.rows) <= self.max_rows and plan.offsets[-1] <= self.token_buckets[-1]
                and all(len(r.span.block_table) <= self.width for r in plan.rows))

    def run(self, plan: StepPlan, out) -> None:
        """Replay the step of `plan` (one the graphs hold); fills `out` (a runner.StepOutput) with pauses,
        captures and logits."""
        self._replay(self._prepare(plan), out)

    def run_loaded(self, rows, out) -> bool:
        """Replay the step loaded ahead for exactly these rows in this state, if it was (see load_ahead)."""
        if self._ahead is None or self._ahead[0] != self._identity(rows):
            return False
        replay = self._ahead[2]  # its inputs are already on the device
        replay.plan.rows, self._ahead = rows, None
        if replay.plan.edits:
            out.watch_edits(rows, self.runner.edits_ok)
        self._replay(replay, out)
        return True

    def load_ahead(self, rows) -> None:
        """Capture what the step of `rows` needs and put its inputs on the device now: called when the host
        would otherwise wait (a lone row paused, its client yet to answer). Any other step's inputs
        replace these; `run_loaded` uses them only for the same rows in the same state."""
        plan = plan_step(rows, self.runner.table)
        if self.holds(plan) and not plan.details and all(r.detail is None for r in rows):
            replay = self._prepare(plan)
            plan.rows = []  # not kept alive by this (their saved state is the resume's to drop)
            # the rows' plans are kept alive instead: their ids in the identity cannot come back as others'
            self._ahead = (self._identity(rows), [r.plan for r in rows], replay)

    @staticmethod
    def _identity(rows) -> list:
        """What a step's inputs depend on, row by row."""
        return [(id(r), r.entry, r.step, id(r.plan), r.span.start, r.span.n_tokens, tuple(r.span.block_table))
                for r in rows]

    def _prepare(self, plan: StepPlan) -> Replay:
        """Derive the step's padded size and segment keys, capture the segments it needs (or, for a step with
        prompts, queue them: record_later), load its inputs."""
        tb = bucket_of(plan.offsets[-1], self.token_buckets)
        rb = None if plan.decode else bucket_of(len(plan.rows), BUCKETS)
        kept = bool(plan.details) and self.keeps_scores(plan)
        cuts = plan.cuts if kept or not plan.details else sorted(set(plan.cuts).union(*map(self._op_cuts, plan.details)))
        runs = segments(cuts, self.final)
        keys = [SegmentKey(tb, rb, a, b, j == len(runs) - 1, tuple(s for s in sorted(plan.edits) if a <= s <= b))
                for j, (a, b) in enumerate(runs)]
        # a segment no row computes for is skipped (a prompt paused or resumed alone costs no extra work)
        needed = [any(s.first <= a and s.last >= b for s in plan.sites) for a, b in runs]
        missing = [key for key, need in zip(keys, needed) if need and key not in self._graphs]
        if rb is not None and self.record_later:
            self._pending.update(dict.fromkeys(missing))
        else:
            for key in missing:  # before the inputs go in: capturing runs the forward
                self._segment(key)
        self._load_inputs(plan, tb, kept)
        return Replay(plan, tb, cuts, keys, needed, kept)

    def _op_cuts(self, host: int) -> tuple[int, ...]:
        """Where the host works inside the op of chain site `host`: after it (its output is in the static
        buffers; its input too, but for the output projection, whose input z is left after the site before,
        and a parallel block's MLP, whose input, the block's, is kept after its attention output)."""
        if self.sites[host].op == "attn_out":
            return host - 1, host
        if self._reads_block_input(host):
            return host - 2, host
        return (host,)

    def _reads_block_input(self, host: int) -> bool:
        return self.runner.parallel and self.sites[host].op == "mlp_out"

    def record_decode_steps(self) -> None:
        """Record the plain decode step (one token a row, no cut, no edit: one graph of the whole forward) at
        every padded row count now, so that no decode step a session meets waits for a capture."""
        for rows in BUCKETS:
            self._segment(SegmentKey(bucket_of(rows, self.token_buckets), None, 0, self.final, True, ()))

    def has_pending(self) -> bool:
        return bool(self._pending)

    def record_pending(self) -> bool:
        """Record one segment of a step that ran eagerly for want of it; returns whether one was left."""
        if not self._pending:
            return False
        key = next(iter(self._pending))
        del self._pending[key]
        self._segment(key)
        return True

    def _segment(self, key: SegmentKey) -> None:
        """Make the segment of `key` replayable, unless it already is."""
        if key not in self._graphs:
            started = time.perf_counter()
            self._graphs[key] = self._record(key)
            self.stats.graphs_recorded += 1
            self.stats.graph_record_seconds += time.perf_counter() - started

    def _replay(self, replay: Replay, out) -> None:
        plan, tb = replay.plan, replay.tokens
        rows, n = plan.rows, len(plan.rows)
        for site in sorted(plan.edits):
            self._load_edits(site, plan, tb)
        logits = None
        for j, (need, key) in enumerate(zip(replay.needed, replay.keys)):
            if need:  # a segment queued for recording runs its forward uncaptured: the same kernels and bits
                replay_segment = self._graphs.get(key)
                logits = replay_segment() if replay_segment is not None else self._forward(key)
            if j < len(replay.cuts):
                cut = replay.cuts[j]
                met = self._work_inside(cut, plan, out) if cut in plan.details and not replay.kept_scores else {}
                self._at_cut(cut, plan, out, met)
                if cut + 2 in plan.details and self._reads_block_input(cut + 2):  # the next segment overwrites it
                    self._block_inputs[cut + 2] = self.resid[:tb].clone()
        if replay.kept_scores:
            self._take_scores(plan, out)
        done = [i for i, s in enumerate(plan.sites) if s.pause is None and s.last == self.final]
        out.stopped = [rows[i] for i, s in enumerate(plan.sites) if s.pause is None and s.last < self.final]
        if len(done) == n:
            out.finished, out.logits = rows, logits[:n]
        elif done:
            out.finished = [rows[i] for i in done]
            out.logits = logits.index_select(0, to_device(torch.tensor(done), self.device))

    def _work_inside(self, host: int, plan: StepPlan, out) -> dict[int, torch.Tensor]:
        """The rows' work inside the op of chain site `host` (runner.work_inside), between the segments around
        it: a row that edits there takes the detailed output (then its edits at `host`, which the segment
        applied to the fast output, again). Returns the values of the pauses met, by row."""
        site = self.sites[host]
        resid, branch = self._state(host)
        value = resid if site.kind == RESID else branch
        met = {}
        for i, (r, s) in enumerate(zip(plan.rows, plan.sites)):
            work = s.details.get(host)
            if work is None:
                continue
            lo, hi = plan.offsets[i], plan.offsets[i + 1]
            new, paused = self.runner.work_inside(site, r, self._op_input(site, lo, hi), work, out)
            if new is not None:
                chain_edits = plan.edits.get(host, [[]] * len(plan.rows))[i]
                if chain_edits:
                    new = self.runner.part(site, edit_row(self.runner.whole(site, new), chain_edits, r))
                value[lo:hi] = new
            if paused is not None:
                met[i] = paused
        return met

    def _op_input(self, site, lo: int, hi: int) -> torch.Tensor:
        """A row's input to the op of chain site `site`, from the static buffers after the site (the embedding:
        its tokens, fed ones included; the output projection: z, left there by the site before; a parallel
        block's MLP: the block's input, kept at the cut after its attention output)."""
        if site.op == "embed":
            src = self.feed_from[lo:hi]
            return torch.where(src < 0, self.tokens[lo:hi], self.runner.sampled[src.clamp(min=0)])
        if site.op == "attn_out":
            return self.branch[True][lo:hi].clone()
        if self._reads_block_input(site.index):
            return self._block_inputs[site.index][lo:hi]
        return self.resid[lo:hi].clone()

    def _at_cut(self, site_index: int, plan: StepPlan, out, met: dict[int, torch.Tensor]) -> None:
        """After `site_index`: stage captures, take out the rows pausing here (`met`: the values of pauses at
        detail sites inside the op, by row), put in those re-entering after it."""
        site = self.sites[site_index]
        resid, branch = self._state(site_index)
        value = resid if site.kind == RESID else branch
        whole = self.runner.whole  # what a client sees of a value a tensor-parallel rank holds a part of
        for i, (r, s) in enumerate(zip(plan.rows, plan.sites)):
            lo, hi = plan.offsets[i], plan.offsets[i + 1]
            for at, probe in s.captures:
                if at == site_index:  # a copy first: the buffers change with the next segment
                    self.runner.take(out, r, probe, whole(site, value[lo:hi].clone()))
            if s.pause is not None and s.last == site_index:
                act = met[i] if i in met else whole(site, value[lo:hi])
                kept = None if branch is None else whole(site, branch[lo:hi])
                out.paused.append(r.pause_here(s.pause, site_index, resid[lo:hi], kept, act, 0, hi - lo))
            elif s.first == site_index + 1:
                resid[lo:hi].copy_(r.resid)
                if branch is not None:
                    branch[lo:hi].copy_(self.runner.part(site, r.branch))
                r.reenter()

    def _take_scores(self, plan: StepPlan, out) -> None:
        """The scores and patterns the kernel kept for the rows that read them, every layer's in one copy."""
        for k, i in enumerate(i for i, s in enumerate(plan.sites) if s.details):
            r, wanted = plan.rows[i], self._kept_scores(plan.sites[i])
            scores = self.scores[k, :, :, None, :r.span.start + 1]  # [n_layers, n_heads, 1, T_k]
            staged = {local: self.runner.stager.stage(torch.softmax(scores, -1) if local == "attn.hook_pattern"
                                                      else scores.clone())
                      for local in {site.local for site, _ in wanted}}
            for site, probe in wanted:
                out.captures.append((r, probe.name, StagedPart(staged[site.local], site.layer)))

    def _state(self, site_index: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The static buffers that hold the state after `site_index` (its branch value only after a branch site)."""
        site = self.sites[site_index]
        return self.resid, (None if site.kind == RESID else self.branch[site.per_head])

    def _load_inputs(self, plan: StepPlan, tb: int, kept_scores: bool = False) -> None:
        mr, w, bs = self.max_rows, self.width, self.block_size
        self._ahead = None  # the device buffers are about to hold this step's inputs
        for ring in (self._hosts, self._host_fields, self._tables_written, self._copied):
            ring.reverse()
        if self._copied[0] is not None:
            self._copied[0].synchronize()
        f = self._host_fields[0]
        n_tok = plan.offsets[-1]
        # padding tokens: a row of their own (table row 0, all scratch), positions 0.., writing into scratch
        pad = np.arange(tb - n_tok)
        f["tokens"][n_tok:tb], f["positions"][n_tok:tb], f["write_offsets"][n_tok:tb] = 0, pad, pad % bs
        f["own_blocks"][n_tok:tb] = self.scratch_block
        f["feed_from"][:tb] = -1
        f["first"][n_tok:tb], f["last"][n_tok:tb] = 0, self.final
        f["token_row"][n_tok:tb] = 0
        f["score_slot"][:tb] = -1
        readers = [i for i, s in enumerate(plan.sites) if s.details] if kept_scores else []
        if readers:
            f["score_slot"][[plan.offsets[i] for i in readers]] = np.arange(len(readers))
            if self.window and max(plan.rows[i].span.start for i in readers) >= self.window:
                self.scores[:len(readers)].fill_(float("-inf"))  # keys before the window's start are not written
        tables = f["tables"].reshape(mr + 1, w)
        written = self._tables_written[0]  # each table row as this buffer holds it: rewritten only on change
        tok, posf, wo, ff, own = (f[k] for k in ("tokens", "positions", "write_offsets", "feed_from", "own_blocks"))
        firsts, lasts, trow = f["first"], f["last"], f["token_row"]
        # decode rows (one token each, often many a step) are gathered into lists and written at once
        at, starts, blocks, row_first, row_last, rows, token_at, token_ids, fed_at, fed_from = ([] for _ in range(10))
        for i, (r, s) in enumerate(zip(plan.rows, plan.sites)):
            lo, hi = plan.offsets[i], plan.offsets[i + 1]
            bt, start = r.span.block_table, r.span.start
            if hi - lo == 1:
                at.append(lo)
                starts.append(start)
                blocks.append(bt[start // bs])
                row_first.append(s.first)
                row_last.append(s.last)
                rows.append(i + 1)
                if s.first == 0:
                    token_at.append(lo)
                    token_ids.append(r.tokens[0])
            else:
                pos = np.arange(start, start + hi - lo)
                posf[lo:hi], wo[lo:hi], own[lo:hi] = pos, pos % bs, np.asarray(bt, dtype=np.int64)[pos // bs]
                firsts[lo:hi], lasts[lo:hi], trow[lo:hi] = s.first, s.last, i + 1
                if s.first == 0:
                    tok[lo:hi] = r.tokens
            if s.first == 0 and r.feed_from is not None:  # the row's first token: sampled by the step before
                fed_at.append(lo)
                fed_from.append(r.feed_from)
            table = tuple(bt)
            if written.get(i + 1) != table:
                tables[i + 1, : len(bt)] = bt
                tables[i + 1, len(bt):] = self.scratch_block
                written[i + 1] = table
        if at:
            pos = np.asarray(starts)
            posf[at], wo[at], own[at] = pos, pos % bs, blocks
            firsts[at], lasts[at], trow[at] = row_first, row_last, rows
        if token_at:
            tok[token_at] = token_ids
        if fed_at:
            ff[fed_at] = fed_from
        f["last_token"][:len(plan.rows)] = np.asarray(plan.offsets[1:]) - 1
        f["last_token"][len(plan.rows):] = 0  # padded rows' logits come from token 0
        used = self._layout["tables"][0] + (len(plan.rows) + 1) * w
        self._dev[:used].copy_(self._hosts[0][:used], non_blocking=True)
        if self.capture:
            self._copied[0] = torch.cuda.Event()
            self._copied[0].record()
        else:  # the portable attention path reads a padded layout of this step's inputs
            starts = torch.tensor([r.span.start for r in plan.rows] + ([0] if tb > n_tok else []))
            lens = torch.tensor([r.span.n_tokens for r in plan.rows] + ([tb - n_tok] if tb > n_tok else []))
            rows_used = list(range(1, len(plan.rows) + 1)) + ([0] if tb > n_tok else [])
            ctx = self._static_context(tb, self.own_blocks[:tb])
            ctx.attention.max_context = int((starts + lens).max())
            ctx.attention.block_tables = self.tables[rows_used]
            portable_layout(ctx.attention, starts, lens, ctx.attention.block_tables, self.block_size, self.device)
            self._ctx = ctx

    def _load_edits(self, site: int, plan: StepPlan, tb: int) -> None:
        per_row = plan.edits[site]
        # Edits without positions or steps give the same buffers every step: refill only on change.
        key = (tb, tuple(plan.offsets), tuple(tuple(e.uid for e in es) for es in per_row))
        invariant = all(e.positions is None and e.steps is None for es in per_row for e in es)
        if not (invariant and self._filled.get(site) == key):
            self._fill_edits(site, plan, per_row, tb)
            self._filled[site] = key if invariant else None

    def _fill_edits(self, site: int, plan: StepPlan, per_row: list[list[Edit]], tb: int) -> None:
        """Each row's edits folded per token into one (mul, add), as the eager runner folds them (same bits);
        then all rows written with one indexed copy per buffer."""
        mul, add = self._buffers(site)
        mul[:tb].fill_(1)
        add[:tb].zero_()
        at, muls, adds = [], [], []
        for i, es in enumerate(per_row):
            if es:
                r, lo = plan.rows[i], plan.offsets[i]
                m, a = fold_edits(es, r.span.start, r.span.n_tokens, self._whole_shape(site), self.device)
                at += range(lo, lo + r.span.n_tokens)
                muls.append(self.runner.part(self.sites[site], m))
                adds.append(self.runner.part(self.sites[site], a))
        if at:
            index = to_device(torch.tensor(at), self.device)
            mul.index_copy_(0, index, torch.cat(muls))
            add.index_copy_(0, index, torch.cat(adds))

    def _whole_shape(self, site: int) -> tuple[int, ...]:
        cfg = self.model.cfg
        return (cfg.n_heads, cfg.d_head) if self.sites[site].per_head else (cfg.d_model,)

    def _buffers(self, site: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A site's per-token (mul, add), shaped as this rank computes the value there."""
        if site not in self._edit_bufs:
            shape = (self.heads, self.model.cfg.d_head) if self.sites[site].per_head else (self.model.cfg.d_model,)
            mt = self.token_buckets[-1]
            self._edit_bufs[site] = (torch.ones((mt, *shape), device=self.device),
                                     torch.zeros((mt, *shape), device=self.device))
        return self._edit_bufs[site]

    # ------------------------------------------------------------------ the segments' forward

    def _write_blocks(self, tb: int, first: int, last: int, ends: bool) -> torch.Tensor:
        """Where each token's keys and values go in the segment first..last: its own block, except in a cut
        step's segment outside its row's sites (before it re-enters, after it pauses): the scratch block,
        so nothing it wrote before is overwritten. Computed inside the segment's graph."""
        if first == 0 and ends:  # the whole forward: every row computes every site
            return self.own_blocks[:tb]
        active = (self.row_first[:tb] <= first) & (self.row_last[:tb] >= last)
        return torch.where(active, self.own_blocks[:tb], self.scratch_block)

    def _static_context(self, tb: int, write_blocks: torch.Tensor) -> ForwardContext:
        meta = AttentionMetadata(
            write_blocks=write_blocks, write_offsets=self.write_offsets[:tb],
            block_tables=self.tables, token_row=self.token_row[:tb],
            token_pos=self.positions[:tb], max_context=self.width * self.block_size,
            tallies=self.runner.tallies, score_slots=self.score_slot[:tb], scores=self.scores)
        return ForwardContext(positions=self.positions[:tb], attention=meta, kv=self.kv)

    def _forward(self, key: SegmentKey) -> Optional[torch.Tensor]:
        """Sites first..last on the static state; then the logits if the segment `ends` the forward (each
        row's last token), else the new state in the static buffers."""
        tb, first, last = key.tokens, key.first, key.last
        ctx = self._ctx if not self.capture else self._static_context(tb, self.own_blocks[:tb])
        ctx.attention.write_blocks = self._write_blocks(tb, first, last, key.ends)
        ctx.attention.prefill = key.rows is not None
        ctx.attention.scores = self.scores if key.rows is None else None  # kept in decode steps only
        self.model.prepare(ctx)
        tokens = None
        if first == 0:
            src = self.feed_from[:tb]
            if src.is_cuda:
                from ..kernels.embed import fed_tokens

                tokens = fed_tokens(self.tokens[:tb], src, self.runner.sampled)
            else:
                tokens = torch.where(src < 0, self.tokens[:tb], self.runner.sampled[src.clamp(min=0)])
            resid = branch = None
        else:
            resid, branch = self._state(first - 1)
            resid, branch = resid[:tb], (None if branch is None else branch[:tb])
        for site in self.sites[first:last + 1]:
            # as StepPlan.defer_add: inside a segment only its edited sites and its last (a cut) are explicit
            defer_add = site.index not in key.edited and site.index != last
            resid, branch = self.runner.compute_site(site, resid, branch, ctx, tokens, defer_add)
            if site.index in key.edited:
                mul, add = self._edit_bufs[site.index]
                value = resid if site.kind == RESID else branch
                value.copy_(value.float() * mul[:tb] + add[:tb])  # as the eager path computes it
                self.runner.edits_ok[:tb] &= torch.isfinite(value).flatten(1).all(1)
        if key.ends:
            return self.model.unembed(branch if key.rows is None else branch.index_select(0, self.last_token[:key.rows]))
        out_resid, out_branch = self._state(last)
        out_resid[:tb].copy_(resid)
        if out_branch is not None:
            out_branch[:tb].copy_(branch)
        return None

    def _record(self, key: SegmentKey):
        """A replayable segment: a captured CUDA graph, or (without capture) the forward itself."""
        for site in key.edited:
            self._buffers(site)
        if not self.capture:
            return lambda: self._forward(key)
        # Warm-up and capture run the forward for real on whatever the inputs hold: indices left by a larger
        # step (a last token at 511 for a 64-token graph) would read out of bounds, and key and value
        # writes must go nowhere. So: every index 0, no fed tokens, every write and table into scratch.
        self._ahead = None
        self._dev.zero_()
        self.feed_from.fill_(-1)
        self.score_slot.fill_(-1)
        self.own_blocks.fill_(self.scratch_block)
        self.tables.fill_(self.scratch_block)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(key)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # A garbage collection inside the capture could free an earlier engine's graph (a reference cycle),
        # and destroying a graph while a stream captures breaks the capture: none runs until it ends.
        collecting = gc.isenabled()
        gc.disable()
        try:
            # thread-local: another engine's thread may step on its own streams while this one captures
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                logits = self._forward(key)
        finally:
            if collecting:
                gc.enable()

        def replay() -> Optional[torch.Tensor]:
            graph.replay()
            return logits
        return replay

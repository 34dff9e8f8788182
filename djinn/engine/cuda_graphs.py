"""CUDA graphs of the whole forward for decode steps.

A decode step (every row feeds one token, no breakpoint or capture due) replays a graph captured for its
padded batch size and for the set of sites where edits apply. Interventions stay data: each such site gets
preallocated per-row `mul` and `add` buffers (identity for rows without an edit), and the graph computes
`act * mul + add` there (in float32, like the eager path). Every other step runs eagerly through the same model code.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..models.attention import AttentionMetadata
from ..models.context import ForwardContext
from ..sites import RESID
from .batch import to_device
from .plan import Edit

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class DecodeGraphs:
    def __init__(self, runner, scratch_block: int, max_context: int = 4096):
        self.runner = runner
        self.model, self.kv, self.sites, self.device = runner.model, runner.kv, runner.sites, runner.device
        self.block_size = runner.block_size
        self.scratch_block = scratch_block
        self.max_batch = BUCKETS[-1]
        self.width = -(-max_context // self.block_size)  # block-table columns a graph can read
        mb, w = self.max_batch, self.width
        # One host buffer and one device buffer hold every integer input, so a step is one copy. The host
        # runs a step ahead of the GPU, so two host buffers take turns, each reused only once its last copy
        # has left (the event recorded after it).
        self._hosts = [torch.zeros(5 * mb + mb * w, dtype=torch.long, pin_memory=True) for _ in range(2)]
        self._copied: list[Optional[torch.cuda.Event]] = [None, None]
        self._dev = torch.zeros_like(self._hosts[0], device=self.device)
        self.tokens, self.positions = self._dev[:mb], self._dev[mb:2 * mb]
        self.write_blocks, self.write_offsets = self._dev[2 * mb:3 * mb], self._dev[3 * mb:4 * mb]
        self.feed_from = self._dev[4 * mb:5 * mb]  # index into the previous step's sampled ids, -1: use `tokens`
        self.tables = self._dev[5 * mb:].view(mb, w)
        self.token_row = torch.arange(mb, device=self.device)
        self._edit_bufs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._filled: dict[int, object] = {}  # what each site's buffers hold now
        self._graphs: dict[tuple[int, tuple[int, ...]], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle()
        self.window = runner.window or 0

    # ------------------------------------------------------------------ eligibility

    def plan_step(self, rows) -> Optional[dict[int, list]]:
        """The per-site edits of each row if this step can replay a graph, else None."""
        if not rows or len(rows) > self.max_batch:
            return None
        edits: dict[int, list] = {}
        for i, r in enumerate(rows):
            if r.entry >= 0 or r.span.n_tokens != 1 or len(r.span.block_table) > self.width:
                return None
            plan, step, pos = r.plan, r.step, r.span.start
            if any(p.applies(step) for probes in plan.breakpoints.values() for p in probes):
                return None
            if any(p.applies(step) for probes in plan.captures.values() for p in probes):
                return None
            for site, es in plan.edits.items():
                for e in es:
                    if e.applies(step) and (e.positions is None or pos in e.positions):
                        edits.setdefault(site, [[] for _ in rows])[i].append(e)
        return edits

    # ------------------------------------------------------------------ replay

    def run(self, rows, edits: dict[int, list]):
        n = len(rows)
        bucket = next(b for b in BUCKETS if b >= n)
        mb, w, bs = self.max_batch, self.width, self.block_size
        self._hosts.reverse()
        self._copied.reverse()
        if self._copied[0] is not None:
            self._copied[0].synchronize()
        host = self._hosts[0].numpy()  # numpy view: per-row Python writes here cost far less than tensor ops
        host[: 4 * mb] = 0
        host[2 * mb:3 * mb] = self.scratch_block  # padding rows write into the scratch block
        host[4 * mb:5 * mb] = -1
        tables = host[5 * mb:].reshape(mb, w)
        tables[:bucket] = self.scratch_block
        for i, r in enumerate(rows):
            pos, bt = r.span.start, r.span.block_table
            host[i], host[mb + i] = r.tokens[0], pos
            host[2 * mb + i], host[3 * mb + i] = bt[pos // bs], pos % bs
            if r.feed_from is not None:
                host[4 * mb + i] = r.feed_from
            tables[i, : len(bt)] = bt
        used = 5 * mb + bucket * w
        self._dev[:used].copy_(self._hosts[0][:used], non_blocking=True)
        self._copied[0] = torch.cuda.Event()
        self._copied[0].record()
        signature = tuple(sorted(edits))
        for site in signature:
            per_row = edits[site]
            # Edits without positions or steps give the same buffers every step: refill only on change.
            key = (bucket, tuple(tuple(e.uid for e in es) for es in per_row))
            invariant = all(e.positions is None and e.steps is None for es in per_row for e in es)
            if not (invariant and self._filled.get(site) == key):
                self._fill_edits(site, per_row, [r.span.start for r in rows], bucket)
                self._filled[site] = key if invariant else None
        key = (bucket, signature)
        if key not in self._graphs:
            self._graphs[key] = self._capture(bucket, signature)
        graph, logits = self._graphs[key]
        graph.replay()
        return logits[:n]

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

    def _forward(self, bucket: int, signature: tuple[int, ...]) -> torch.Tensor:
        meta = AttentionMetadata(
            write_blocks=self.write_blocks[:bucket], write_offsets=self.write_offsets[:bucket],
            block_tables=self.tables[:bucket], token_row=self.token_row[:bucket],
            token_pos=self.positions[:bucket], window=self.window, max_context=self.width * self.block_size)
        ctx = ForwardContext(positions=self.positions[:bucket], attention=meta, kv=self.kv)
        self.model.prepare(ctx)
        src = self.feed_from[:bucket]
        tokens = torch.where(src < 0, self.tokens[:bucket], self.runner.sampled[src.clamp(min=0)])
        resid = branch = None
        for site in self.sites:
            resid, branch = self.runner.compute_site(site, resid, branch, ctx, tokens, site.index not in signature)
            if site.index in signature:
                mul, add = self._edit_bufs[site.index]
                value = resid if site.kind == RESID else branch
                value.copy_(value.float() * mul[:bucket] + add[:bucket])  # as the eager path computes it
        return self.model.unembed(branch)

    def _capture(self, bucket: int, signature: tuple[int, ...]):
        saved = self._dev.clone()
        self._dev[2 * self.max_batch:3 * self.max_batch].fill_(self.scratch_block)  # warm-up writes go nowhere
        self.tables.fill_(self.scratch_block)
        for site in signature:
            self._buffers(site)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(bucket, signature)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._forward(bucket, signature)
        self._dev.copy_(saved)
        return graph, logits

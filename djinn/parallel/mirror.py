"""Every rank runs what rank 0 runs, on its own shard.

Rank 0's pool and runner (MirroredPool, MirroredRunner) tell the other ranks each block move and each
step before making it themselves; `follow` is the other ranks' loop that makes them. A step travels as its
rows (what they compute, where their KV lives, a resumed row's saved state), so the other ranks keep no
session state: a pause, a checkpoint or a fork is rank 0's bookkeeping and covers every shard at once, and
the block moves it causes reach every rank in the same order as the steps. Each row's plan travels once and
is kept by id until rank 0 drops it.
"""
from __future__ import annotations

import itertools
import logging
import pickle
import weakref
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..errors import DjinnError
from ..models.config import ModelConfig
from ..sites import SiteTable
from ..engine.batch import RowSpan
from ..engine.detail import DetailPause
from ..engine.kv_pool import KVPool
from ..engine.plan import Plan
from ..engine.runner import Row, Runner, StepOutput
from ..engine.stats import EngineStats
from . import TensorParallel

log = logging.getLogger("djinn.parallel")


def local_config(cfg: ModelConfig, world: int) -> ModelConfig:
    """The config a rank's KV pool is shaped by: its share of the KV heads."""
    return replace(cfg, n_kv_heads=cfg.n_kv_heads // world)


def _on(x: Any, device: torch.device) -> Any:
    return x.to(device) if isinstance(x, torch.Tensor) else x


def plan_on(plan: Plan, device: torch.device) -> Plan:
    """A plan's copy with its tensors on `device` (and nothing any executor derived from it)."""
    edits = {k: [replace(e, mul=_on(e.mul, device), add=_on(e.add, device), replace=_on(e.replace, device))
                 for e in es] for k, es in plan.edits.items()}
    return Plan(defaultdict(list, edits), defaultdict(list, plan.captures), defaultdict(list, plan.breakpoints))


@dataclass
class _Call:
    """What the runner reads of a row's call."""

    scores_positions: bool
    stop_after: Optional[int]


@dataclass
class RowState:
    """A row of a step as the other ranks get it: a resumed row with its saved (whole) state."""

    span: RowSpan
    tokens: list[int]
    step: int
    plan: int
    feed_from: Optional[int]
    entry: Optional[int]
    resid: Optional[torch.Tensor]
    branch: Optional[torch.Tensor]
    detail: Optional[DetailPause]
    scores_positions: bool
    stop_after: Optional[int]

    @staticmethod
    def of(r: Row, plan: int) -> "RowState":
        host = torch.device("cpu")
        detail = r.detail and DetailPause(r.detail.site, _on(r.detail.op_input, host), _on(r.detail.replacement, host))
        return RowState(RowSpan(r.span.start, r.span.n_tokens, list(r.span.block_table)), list(r.tokens), r.step, plan,
                        r.feed_from, r.entry, _on(r.resid, host), _on(r.branch, host), detail,
                        r.request.scores_positions, r.request.stop_after)

    def row(self, plans: dict[int, Plan], device: torch.device) -> Row:
        detail = self.detail and DetailPause(self.detail.site, _on(self.detail.op_input, device),
                                             _on(self.detail.replacement, device))
        return Row(None, _Call(self.scores_positions, self.stop_after), self.span, self.tokens, self.step,
                   plans[self.plan], self.feed_from, self.entry, _on(self.resid, device), _on(self.branch, device),
                   detail)


class MirroredPool(KVPool):
    """Rank 0's KV pool: its share of the KV heads, and every block move told to the other ranks first."""

    def __init__(self, tp: TensorParallel, cfg: ModelConfig, n_blocks: int, n_host_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device):
        super().__init__(local_config(cfg, tp.world), n_blocks, n_host_blocks, block_size, dtype, device)
        self.tp = tp
        tp.leader.tell(("pool", tp.index, n_blocks, n_host_blocks, block_size))

    def _tell(self, move: str, *args: Any) -> None:
        self.tp.leader.tell(("move", self.tp.index, move, args))

    def copy_block(self, src: int, dst: int) -> None:
        self._tell("copy_block", src, dst)
        super().copy_block(src, dst)

    def copy_host(self, src: list[int], dst: list[int]) -> None:
        self._tell("copy_host", list(src), list(dst))
        super().copy_host(src, dst)

    def to_host(self, device_ids: list[int], host_ids: list[int], fence: bool = False):
        self._tell("to_host", list(device_ids), list(host_ids), fence)
        return super().to_host(device_ids, host_ids, fence)

    def to_device(self, host_ids: list[int], device_ids: list[int]) -> None:
        self._tell("to_device", list(host_ids), list(device_ids))
        super().to_device(host_ids, device_ids)

    def settle(self) -> None:
        self._tell("settle")
        super().settle()


class MirroredRunner(Runner):
    """Rank 0's runner: each step is sent to the other ranks, then run here with them."""

    def __init__(self, tp: TensorParallel, model: torch.nn.Module, kv: torch.Tensor, table: SiteTable,
                 block_size: int, device: torch.device, sampled: torch.Tensor, tallies: Optional[torch.Tensor] = None):
        super().__init__(model, kv, table, block_size, device, sampled, tallies)
        self.leader, self.index = tp.leader, tp.index
        self._uids = itertools.count()
        self._dropped: list[int] = []  # plans rank 0 no longer holds: the other ranks drop them with the next step
        self.leader.tell(("runner", tp.index, block_size, len(sampled)))

    def use_graphs(self, scratch_block: int, stats: EngineStats, max_context: int, max_tokens: int,
                   capture: bool) -> None:
        # recording runs the forward, collectives and all: every rank records the same graphs together
        self.leader.send(("graphs", self.index, scratch_block, max_context, max_tokens, capture))
        super().use_graphs(scratch_block, stats, max_context, max_tokens, capture)

    def record_pending(self) -> bool:
        if self.graphs is None or not self.graphs.has_pending():
            return False
        self.leader.send(("record", self.index))  # every rank records the same segment, collectives and all
        return super().record_pending()

    def load_ahead(self, rows: list[Row]) -> None:
        """Nothing ahead: loading may record graphs, which rank 0 cannot do alone; the step is loaded when it
        runs, on every rank."""

    def _plan(self, plan: Plan, new: dict[int, Plan]) -> int:
        uid = plan.memo.get("tp")
        if uid is None:
            uid = plan.memo["tp"] = next(self._uids)
            weakref.finalize(plan, self._dropped.append, uid)
            new[uid] = plan_on(plan, torch.device("cpu"))
        return uid

    def run(self, rows: list[Row]) -> StepOutput:
        self.leader.check()
        new: dict[int, Plan] = {}
        states = [RowState.of(r, self._plan(r.plan, new)) for r in rows]
        # the previous step's sampled ids that this one feeds: the other ranks get them from rank 0's device
        feed = max((r.feed_from for r in rows if r.feed_from is not None), default=-1) + 1
        dropped, self._dropped = self._dropped, []
        self.leader.send(("run", self.index, states, feed, new, dropped))
        try:
            if feed:
                dist.broadcast(self.sampled[:feed], 0, group=self.tp.group)
            return super().run(rows)
        except DjinnError:
            raise
        except Exception as e:  # gloo reports a rank gone as a plain RuntimeError: tell it by the processes
            gone = self.leader.exited()
            if gone is not None or isinstance(e, dist.DistError):
                why = f"rank {gone} exited" if gone is not None else "a collective of the step failed"
                raise self.leader.lose(f"{why} ({type(e).__name__}: {e})") from e
            raise


def follow(conn, models: list[torch.nn.Module], device: torch.device) -> None:
    """The loop of a rank other than 0: make each block move and run each step rank 0 sends, until it says
    stop or its pipe closes (rank 0 is gone)."""
    pools: dict[int, KVPool] = {}
    runners: dict[int, Runner] = {}
    plans: dict[int, dict[int, Plan]] = defaultdict(dict)
    while True:
        try:
            msg = pickle.loads(conn.recv_bytes())
        except EOFError:
            return
        kind, i = msg[0], msg[1]
        if kind == "stop":
            return
        model = models[i]
        if kind == "pool":
            n_blocks, n_host_blocks, block_size = msg[2:]
            pools[i] = KVPool(local_config(model.cfg, model.tp.world), n_blocks, n_host_blocks, block_size,
                              next(model.parameters()).dtype, device)
        elif kind == "runner":
            block_size, n_sampled = msg[2:]
            tallies = None
            if device.type == "cuda":
                from ..kernels import tallies as kernel_tallies

                tallies = kernel_tallies.new(n_sampled * model.cfg.n_kv_heads, device)
            sampled = torch.zeros(n_sampled, dtype=torch.long, device=device)
            runners[i] = Runner(model, pools[i].kv, SiteTable(model.cfg, model.detail_sites), block_size, device,
                                sampled, tallies)
        elif kind == "graphs":
            scratch, *sizes = msg[2:]
            runners[i].use_graphs(scratch, EngineStats(), *sizes)
        elif kind == "record":
            runners[i].record_pending()
        elif kind == "move":
            move, args = msg[2:]
            job = getattr(pools[i], move)(*args)
            if move == "to_host":  # the blocks are rank 0's to reuse once its copy is done: be done first
                job.wait()
        elif kind == "run":
            states, feed, new, dropped = msg[2:]
            for uid in dropped:
                plans[i].pop(uid, None)
            plans[i].update({uid: plan_on(p, device) for uid, p in new.items()})
            runner = runners[i]
            if feed:
                dist.broadcast(runner.sampled[:feed], 0, group=model.tp.group)
            try:
                runner.run([s.row(plans[i], device) for s in states])
            except dist.DistError:  # the group is broken: this rank is done
                raise
            except (DjinnError, RuntimeError, ValueError):  # rank 0 meets the same error in the same place
                log.debug("a step failed on this rank as on rank 0", exc_info=True)
                if runner.graphs is not None:
                    runner.graphs.forget_inputs()

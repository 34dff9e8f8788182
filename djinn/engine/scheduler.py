"""Which sessions run in the next step, and where their KV blocks must be for it.

Each step the scheduler takes the runnable sessions in order of arrival, under the step's token budget (a
call that did not fit what was left of it goes first in the next step, so a long prompt is never starved by
sessions decoding before it), and makes each resident: swapped in from the host pool, its unwritten blocks allocated, a block it is about
to write copied first if a fork shares it. Room is made by swapping out sessions outside the step (idle
first, then paused, then running ones not scheduled, least recently used first). A call that finds no room
waits, and says so (`waiting_since`), until blocks free up. The scheduler moves blocks through the pool and
decides; it runs nothing and tells no client anything: that is the worker's (worker.py).
"""
from __future__ import annotations

import time
from typing import Optional

from .batch import RowSpan
from .kv_pool import KVPool
from .runner import Row
from .session import Request, Session, SessionState

# whom to swap out first: the idle, then the paused, then running sessions left out of this step
SWAP_ORDER = {SessionState.IDLE: 0, SessionState.PAUSED: 1, SessionState.RUNNING: 2}


class Scheduler:
    def __init__(self, pool: KVPool, sessions: dict[str, Session], max_step_tokens: int, max_seq_len: int):
        self.pool, self.sessions = pool, sessions
        self.max_step_tokens, self.max_seq_len = max_step_tokens, max_seq_len
        # nothing could run for lack of KV memory: no step is worth trying until something changes (a
        # command, a call ending, housekeeping's next round), so the engine thread does not spin on it
        self.stalled = False

    # ------------------------------------------------------------------ what runs

    def runnable(self, s: Session) -> bool:
        r = s.request
        if r is None:
            return False
        if r.pending is not None:  # its next token is in flight; schedule past it unless that one is the last
            if r.finishing is not None:  # the step in flight feeds the call's last token
                return False
            last_fed = r.return_logits == "all"  # the call's last token is fed too
            return len(r.generated) + 1 < r.max_new_tokens + last_fed and r.pending[1] < self.max_seq_len
        return s.state == SessionState.RUNNING or (s.state == SessionState.PAUSED and r.resumed)

    def has_work(self) -> bool:
        return not self.stalled and any(self.runnable(s) for s in self.sessions.values())

    def schedule(self, in_flight: set[int]) -> list[Row]:
        """The rows of the next step, each session resident for it. `in_flight`: ids of the sessions the
        step still on the device computes for; they stay where they are."""
        candidates = sorted((s for s in self.sessions.values() if self.runnable(s)),
                            key=lambda s: (not s.request.passed_over, s.request.seq))
        rows: list[Row] = []
        in_step = set(in_flight)
        used = 0
        for k, s in enumerate(candidates):
            req = s.request
            if used >= self.max_step_tokens:  # full: the rest go first in the next step
                for later in candidates[k:]:
                    later.request.passed_over = True
                break
            if req.resumed:
                n, end = req.pause.row.span.n_tokens, req.pause.row.span.start + req.pause.row.span.n_tokens
            elif req.pending is not None:  # feed the token the step in flight samples, after its tokens
                n, end = 1, req.pending[1] + 1
            else:
                n, end = len(s.history) - s.kv_len, len(s.history)
            if rows and used + n > self.max_step_tokens:
                req.passed_over = True
                continue
            if not self.make_resident(s, end, in_step):  # any session not in this step may be swapped out
                if req.waiting_since is None:
                    req.waiting_since = time.monotonic()
                continue
            req.waiting_since, req.passed_over = None, False
            rows.append(self._row(s, req, n))
            s.last_used = time.monotonic()
            in_step.add(id(s))
            used += n
        self.stalled = not rows and not in_flight
        return rows

    @staticmethod
    def _row(s: Session, req: Request, n: int) -> Row:
        if req.resumed:  # the row it paused with re-enters at its site
            row = req.pause.row
            row.span.block_table = s.blocks  # blocks may have moved through a swap
            req.pause, req.resumed = None, False
            s.state = SessionState.RUNNING
            return row
        if req.pending is not None:
            index, position = req.pending
            return Row(s, req, RowSpan(position, 1, s.blocks), [0], req.step + 1, req.plan, feed_from=index)
        return Row(s, req, RowSpan(s.kv_len, n, s.blocks), s.history[s.kv_len:], req.step, req.plan)

    # ------------------------------------------------------------------ calls waiting for memory

    def waiting(self) -> list[Request]:
        """Calls waiting for KV memory, longest first."""
        return sorted((s.request for s in self.sessions.values()
                       if s.request is not None and s.request.waiting_since is not None), key=lambda r: r.seq)

    def queue_position(self, s: Session) -> Optional[int]:
        if s.request is None or s.request.waiting_since is None:
            return None
        return 1 + sum(r.seq < s.request.seq for r in self.waiting())

    def overdue(self, now: float, timeout: float) -> list[Session]:
        """Sessions whose call has waited for KV memory longer than `timeout`; the others may try again."""
        self.stalled = False
        return [s for s in self.sessions.values()
                if s.request is not None and s.request.waiting_since is not None
                and now - s.request.waiting_since > timeout]

    # ------------------------------------------------------------------ residency

    def make_resident(self, s: Session, end: int, protected: set[int]) -> bool:
        """Ensure `s` is on the device with blocks covering positions < end, its written block unshared;
        sessions in `protected` (and `s`) are not swapped out for it."""
        pool = self.pool
        start_block = s.kv_len // pool.block_size
        refcount = pool.device_blocks.refcount
        if (not s.swapped and pool.blocks_for(end) <= len(s.blocks)
                and all(refcount[b] == 1 for b in s.blocks[start_block:])):
            return True  # the common case (most decode steps): nothing to move, allocate or copy
        protected = protected | {id(s)}
        if s.swapped:
            if not self._make_room(len(s.host_blocks), protected):
                return False
            dev = pool.device_blocks.allocate(len(s.host_blocks))
            pool.to_device(s.host_blocks, dev)
            pool.host_blocks.decref(s.host_blocks)
            s.blocks, s.host_blocks = dev, None
        shared = [b for b in range(start_block, len(s.blocks)) if refcount[s.blocks[b]] > 1]
        if not self._make_room(max(0, pool.blocks_for(end) - len(s.blocks)) + len(shared), protected):
            return False
        for b in shared:  # copy-on-write: this session is about to write into a block another one holds
            (new,) = pool.device_blocks.allocate(1)
            pool.copy_block(s.blocks[b], new)
            pool.device_blocks.decref([s.blocks[b]])
            s.blocks[b] = new
        s.blocks.extend(pool.device_blocks.allocate(max(0, pool.blocks_for(end) - len(s.blocks))))
        return True

    def _make_room(self, n: int, protected: set[int]) -> bool:
        """Free `n` device blocks by swapping out sessions outside `protected`, in SWAP_ORDER, least
        recently used first."""
        if self.pool.device_blocks.n_free >= n:
            return True
        victims = sorted((s for s in self.sessions.values() if id(s) not in protected and s.blocks),
                         key=lambda s: (SWAP_ORDER[s.state], s.last_used))
        for v in victims:
            self.swap_out(v)
            if self.pool.device_blocks.n_free >= n:
                return True
        return False

    def swap_out(self, s: Session) -> bool:
        """Move the session's blocks to the host pool (False: nothing to move, or no room there)."""
        if s.swapped or not s.blocks or self.pool.host_blocks.n_free < len(s.blocks):
            return False
        host = self.pool.host_blocks.allocate(len(s.blocks))
        self.pool.to_host(s.blocks, host, fence=True)
        self.pool.device_blocks.decref(s.blocks)
        s.blocks, s.host_blocks = [], host
        return True

    def trim(self, s: Session) -> None:
        """Drop blocks beyond what the committed tokens need (after a call ended with a step queued past it)."""
        keep = self.pool.blocks_for(s.kv_len)
        if s.swapped:
            self.pool.host_blocks.decref(s.host_blocks[keep:])
            s.host_blocks = s.host_blocks[:keep]
        else:
            self.pool.device_blocks.decref(s.blocks[keep:])
            s.blocks = s.blocks[:keep]

    def free(self, s: Session) -> None:
        """Give back every block the session holds."""
        self.pool.device_blocks.decref(s.blocks)
        s.blocks = []
        if s.swapped:
            self.pool.host_blocks.decref(s.host_blocks)
            s.host_blocks = None

"""The scheduler on its own, over a small KV pool of a tiny model config (nothing is computed): the token
budget, order of arrival and the priority of a call left out, swap decisions, copy-on-write, paused and
resumed sessions, and calls waiting for memory."""
from __future__ import annotations

import itertools

import torch

from djinn.engine.batch import RowSpan
from djinn.engine.kv_pool import KVPool
from djinn.engine.plan import Plan
from djinn.engine.runner import Pause, Row
from djinn.engine.sampling import SamplingParams
from djinn.engine.scheduler import Scheduler
from djinn.engine.session import Request, Session, SessionState
from djinn.models.config import ModelConfig

CFG = ModelConfig(family="llama", vocab_size=32, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1, d_mlp=16,
                  max_seq_len=256)
BLOCK = 4
_ids = itertools.count()


def scheduler(device_blocks: int = 64, host_blocks: int = 64, budget: int = 64) -> Scheduler:
    pool = KVPool(CFG, device_blocks, host_blocks, BLOCK, torch.float32, torch.device("cpu"))
    return Scheduler(pool, {}, budget, CFG.max_seq_len)


def add(sched: Scheduler, n_prompt: int, max_new: int = 8, last_used: float = 0.0) -> Session:
    """A session with a call of `n_prompt` prompt tokens, running, arrived after every earlier one."""
    s = Session(f"s{next(_ids)}", "owner", "m", history=list(range(n_prompt)), last_used=last_used)
    s.request = Request(max_new, SamplingParams(), frozenset(), False, Plan(), lambda ev: None, 0)
    s.state = SessionState.RUNNING
    sched.sessions[s.id] = s
    return s


def commit(rows: list[Row]) -> None:
    """What the worker does once a step's tokens are read: the rows' tokens are in the cache, one more each."""
    for r in rows:
        s, req = r.session, r.request
        s.kv_len += r.span.n_tokens
        s.history.append(0)
        req.step += 1
        req.generated.append(0)


def idle(s: Session) -> None:
    s.request, s.state = None, SessionState.IDLE


def pause(s: Session, row: Row) -> None:
    s.state, s.request.pause = SessionState.PAUSED, Pause(row, "blocks.0.hook_resid_post", torch.zeros(1))


def test_rows_come_in_order_of_arrival_under_the_token_budget():
    sched = scheduler(budget=25)
    a, b, c = add(sched, 10), add(sched, 10), add(sched, 10)
    rows = sched.schedule(set())
    assert [r.session for r in rows] == [a, b] and [r.span.n_tokens for r in rows] == [10, 10]
    commit(rows)
    # c was left out for the budget: it goes first now, the decoding rows fill what is left
    rows = sched.schedule(set())
    assert [r.session for r in rows] == [c, a, b] and [r.span.n_tokens for r in rows] == [10, 1, 1]


def test_a_prompt_larger_than_the_budget_runs_alone():
    sched = scheduler(budget=8)
    big = add(sched, 20)
    add(sched, 3)
    rows = sched.schedule(set())
    assert [r.session for r in rows] == [big] and rows[0].span.n_tokens == 20


def test_many_decoding_sessions_do_not_starve_a_late_prompt():
    sched = scheduler(device_blocks=200, budget=16)
    decoders = [add(sched, 1, max_new=100) for _ in range(12)]
    commit(sched.schedule(set()))
    late = add(sched, 12)
    first = sched.schedule(set())  # 12 decode tokens leave 4: the prompt waits one step, not until they end
    assert late not in {r.session for r in first}
    commit(first)
    second = sched.schedule(set())
    assert second[0].session is late and sum(r.span.n_tokens for r in second) <= 16
    commit(second)
    # the decoders left out of that step run in the next, before the ones that just ran
    third = sched.schedule(set())
    left_out = [d for d in decoders if d not in {r.session for r in second}]
    assert left_out and [r.session for r in third][:len(left_out)] == left_out


def test_swap_out_takes_idle_then_paused_then_running_least_recently_used_first():
    sched = scheduler(device_blocks=8, host_blocks=64)
    idle_old, idle_new, paused, running = (add(sched, 8, last_used=t) for t in (1.0, 2.0, 0.5, 0.1))
    rows = sched.schedule(set())  # all four fit: 2 blocks each
    assert len(rows) == 4
    commit(rows)
    idle(idle_old)
    idle(idle_new)
    idle_old.last_used, idle_new.last_used, paused.last_used, running.last_used = 1.0, 2.0, 0.5, 0.1
    pause(paused, rows[2])
    running.request.max_new_tokens, running.request.pending = 2, (0, 9)  # its last token in flight: not runnable
    newcomer = add(sched, 8)
    assert [r.session for r in sched.schedule(set())] == [newcomer]
    assert idle_old.swapped and not idle_new.swapped and not paused.swapped  # one session's room was enough
    newcomer.request.max_new_tokens, newcomer.request.pending = 1, (0, 8)  # still computing: in flight
    again = add(sched, 16)  # 4 blocks: the other idle one, then the paused one go
    assert [r.session for r in sched.schedule({id(newcomer)})] == [again]
    assert idle_new.swapped and paused.swapped and not running.swapped and not newcomer.swapped
    # a swapped session comes back before it runs
    idle_old.request = Request(4, SamplingParams(), frozenset(), False, Plan(), lambda ev: None, 0)
    idle_old.state = SessionState.RUNNING
    sched.schedule(set())
    assert not idle_old.swapped and len(idle_old.blocks) == 3  # 9 tokens in the cache and the new one


def test_a_session_writing_into_a_shared_block_copies_it_first():
    sched = scheduler()
    s = add(sched, 6)
    commit(sched.schedule(set()))
    fork = Session("fork", "owner", "m", history=list(s.history), kv_len=s.kv_len, blocks=list(s.blocks))
    sched.pool.device_blocks.incref(s.blocks)
    sched.sessions[fork.id] = fork
    shared_last = s.blocks[-1]
    rows = sched.schedule(set())  # s writes position 6, in its second block, which the fork shares
    assert rows[0].session is s and s.blocks[0] == fork.blocks[0] and s.blocks[1] != shared_last
    assert fork.blocks[1] == shared_last and sched.pool.device_blocks.refcount[shared_last] == 1


def test_a_paused_session_is_never_scheduled_and_a_resumed_one_at_once():
    sched = scheduler()
    s, other = add(sched, 5), add(sched, 5)
    rows = sched.schedule(set())
    pause(s, rows[0])
    for _ in range(3):
        assert [r.session for r in sched.schedule(set())] == [other]
    s.request.resumed = True
    paused_row = s.request.pause.row
    rows = sched.schedule(set())
    assert rows[0] is paused_row  # it re-enters with the state it paused with
    assert s.state == SessionState.RUNNING and s.request.pause is None and not s.request.resumed


def test_a_call_that_finds_the_pool_full_waits_and_runs_once_blocks_free_up():
    sched = scheduler(device_blocks=4, host_blocks=0)
    holder = add(sched, 12)
    rows = sched.schedule(set())
    pause(holder, rows[0])  # 3 blocks, and no host pool to swap into
    waiter, later = add(sched, 8), add(sched, 8)
    assert sched.schedule(set()) == [] and sched.stalled and not sched.has_work()
    assert sched.queue_position(waiter) == 1 and sched.queue_position(later) == 2
    assert sched.waiting() == [waiter.request, later.request]
    assert sched.overdue(waiter.request.waiting_since + 10, 5.0) == [waiter, later]
    assert not sched.stalled  # asked again after housekeeping
    sched.free(holder)
    del sched.sessions[holder.id]
    rows = sched.schedule(set())
    assert [r.session for r in rows] == [waiter, later]
    assert sched.waiting() == [] and sched.queue_position(waiter) is None


def test_trim_and_free_give_blocks_back():
    sched = scheduler(device_blocks=8)
    s = add(sched, 10)
    sched.schedule(set())
    assert len(s.blocks) == 3 and sched.pool.device_blocks.n_free == 5
    s.kv_len = 4  # the call ended before its prompt went through
    sched.trim(s)
    assert len(s.blocks) == 1
    sched.free(s)
    assert s.blocks == [] and sched.pool.device_blocks.n_free == 8

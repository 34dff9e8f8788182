"""One user's data never reaches another user's tokens, and one user's failure is theirs alone: a row reads
only its own keys and values (never a stale block or another row's), an edit that overflows or a parameter
out of range fails that call alone, a row that breaks a step fails alone while the others are run again,
and the KV pool is shared: idle sessions expire, one key holds at most its share, and a request that fits
waits for memory instead of failing. The engine is driven step by step here (eager and graph paths); the
same over a loopback server with two API keys is in test_tenant_server.py."""
import time

import pytest
import torch

import djinn
from djinn.engine.engine import Engine
from djinn.engine.plan import Edit
from djinn.models.loading import load_model

LONG = [1] + list(range(20, 60))  # a row with more context than SHORT: SHORT's gathered keys reach past its own
SHORT = [1, 403, 9]
N = 12


@pytest.fixture(scope="module")
def loaded(stories_path):
    return load_model(str(stories_path))


def start(engine, owner, prompt, n=N, **kw):
    sid = engine.create_session(owner)
    events = []
    engine.generate(sid, owner, prompt, events.append, max_new_tokens=n, **kw)
    return sid, events


def finish(engine):
    while engine.has_work():
        engine.step()
    engine.drain()


def result(events):
    last = events[-1]
    assert isinstance(last, djinn.Done), last
    return last.result.token_ids


def error(events):
    last = events[-1]
    assert isinstance(last, djinn.Error), last
    return last.error


@pytest.fixture(scope="module")
def references(loaded):
    """Each prompt's tokens, batched with the other, on a clean engine."""
    engine = Engine([loaded], kv_blocks=64)
    _, long_ev = start(engine, "B", LONG)
    _, short_ev = start(engine, "B", SHORT)
    finish(engine)
    return result(long_ev), result(short_ev)


@pytest.mark.parametrize("graphs", [False, True])
def test_a_row_never_reads_stale_or_foreign_cache_slots(loaded, references, graphs):
    """Every slot of the pool holds NaN before two rows run side by side: the shorter row's gathered layout
    spans the longer row's context (padded table entries, the tails of its own blocks), and it must read
    none of it."""
    engine = Engine([loaded], kv_blocks=64, cuda_graphs=graphs)
    engine.workers["stories260K"].pool.kv.fill_(float("nan"))
    _, long_ev = start(engine, "B", LONG)
    _, short_ev = start(engine, "B", SHORT)
    finish(engine)
    assert (result(long_ev), result(short_ev)) == references


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("edits", [
    [djinn.Scale("blocks.0.hook_resid_post", 1e38)],  # overflows float32: inf, then NaN keys and values
    # the overflow is overwritten before the logits (which stay finite): the edit itself still fails the call
    [djinn.Scale("blocks.0.hook_resid_post", 1e38), djinn.Ablate("blocks.3.hook_resid_post"),
     djinn.Steer("blocks.3.hook_resid_post", torch.ones(64))],
    [djinn.Steer("blocks.2.hook_attn_out", torch.full((64,), 3e38)),
     djinn.Steer("blocks.2.hook_attn_out", torch.full((64,), 3e38))],  # each finite, their sum is not
])
def test_an_overflowing_edit_fails_its_own_call_alone(loaded, references, graphs, edits):
    engine = Engine([loaded], kv_blocks=64, cuda_graphs=graphs)
    bad, bad_ev = start(engine, "A", [1, 50, 60, 70, 80, 90], interventions=edits)
    _, long_ev = start(engine, "B", LONG)
    _, short_ev = start(engine, "B", SHORT)
    finish(engine)
    assert isinstance(error(bad_ev), djinn.NonFinite)
    assert (result(long_ev), result(short_ev)) == references
    # the failed call left NaN in blocks it freed; they serve others next, who must not notice
    assert engine.session_info(bad, "A").kv_len == 0
    engine.close_session(bad, "A")
    _, long_ev = start(engine, "B", LONG)
    _, short_ev = start(engine, "B", SHORT)
    finish(engine)
    assert (result(long_ev), result(short_ev)) == references


def test_logits_that_overflow_fail_the_call_and_keep_the_session(loaded):
    """No edit overflows here, the model's own computation does (a huge steer of the final norm's output is
    finite, the unembedding's products are not): the call fails with NonFinite after its committed tokens."""
    engine = Engine([loaded], kv_blocks=64)
    sid, ev = start(engine, "A", SHORT, n=4)
    finish(engine)
    before = engine.session_info(sid, "A").n_tokens
    ev.clear()
    engine.generate(sid, "A", [], ev.append, max_new_tokens=4,
                    interventions=[djinn.Steer("ln_final.hook_out", torch.full((64,), 3e38), steps=[2])])
    finish(engine)
    assert isinstance(error(ev), djinn.NonFinite) and "logits" in str(error(ev))
    assert sum(isinstance(e, djinn.Token) for e in ev) == 2  # steps 0 and 1 went through
    assert engine.session_info(sid, "A").n_tokens == before + 2


def test_values_that_overflow_the_compute_dtype_are_refused_before_they_run(loaded):
    engine = Engine([loaded], kv_blocks=64)
    sid = engine.create_session("A")
    huge = torch.full((64,), 1e300, dtype=torch.float64)  # finite as float64, inf as float32
    for edit in [djinn.Replace("blocks.1.hook_resid_post", huge), djinn.Ablate("blocks.1.hook_resid_post", huge),
                 djinn.Steer("blocks.1.hook_resid_post", huge), djinn.Steer("blocks.1.hook_resid_post",
                                                                           torch.full((64,), 1e30), scale=1e10),
                 djinn.Scale("blocks.1.hook_resid_post", 1e300), djinn.Scale("blocks.1.hook_resid_post", huge),
                 djinn.Scale("blocks.1.hook_resid_post", 10 ** 400), djinn.Steer("blocks.1.hook_resid_post",
                                                                                torch.ones(64), scale=10 ** 400)]:
        with pytest.raises(djinn.InvalidTensor):
            engine.generate(sid, "A", SHORT, lambda e: None, interventions=[edit])
    # a resume's replacement too
    events = []
    engine.generate(sid, "A", SHORT, events.append, max_new_tokens=2,
                    breakpoints=[djinn.Breakpoint("blocks.1.hook_resid_post")])
    finish(engine)
    assert isinstance(events[-1], djinn.Paused)
    with pytest.raises(djinn.InvalidTensor, match="beyond the range"):
        engine.resume(sid, "A", events[-1].activation.double() * 1e300)
    engine.resume(sid, "A")
    finish(engine)
    assert len(result(events)) == 2


@pytest.mark.parametrize("params", [
    {"top_k": 2 ** 64 - 1, "temperature": 1.0}, {"top_k": -1}, {"top_k": 1.5}, {"temperature": 10 ** 400},
    {"temperature": float("nan")}, {"temperature": 1e-9}, {"temperature": 1e5}, {"top_p": 0.0},
    {"top_p": 1.5}, {"top_p": 10 ** 400}, {"seed": 2 ** 70}, {"seed": 1.0}, {"top_k": True},
])
def test_sampling_parameters_out_of_range_are_refused_before_they_run(loaded, params):
    engine = Engine([loaded], kv_blocks=64)
    sid = engine.create_session("A")
    with pytest.raises(djinn.InvalidRequest):
        engine.generate(sid, "A", SHORT, lambda e: None, **params)
    assert engine.session_info(sid, "A").n_tokens == 0


def test_top_k_beyond_the_vocabulary_keeps_every_token(loaded):
    engine = Engine([loaded], kv_blocks=64)
    _, wide = start(engine, "A", SHORT, temperature=0.8, top_k=10 ** 6, seed=3)
    _, full = start(engine, "A", SHORT, temperature=0.8, top_k=0, seed=3)
    finish(engine)
    assert result(wide) == result(full)


class Exploding(Edit):
    """An edit that raises inside the step (no client can send one: it stands in for a fault that one
    row's data causes, which the step cannot foresee)."""

    def applies(self, step: int) -> bool:
        raise RuntimeError("this row's edit broke the step")


@pytest.mark.parametrize("graphs", [False, True])
def test_a_row_that_breaks_the_step_fails_alone_and_the_others_run_again(loaded, references, graphs):
    engine = Engine([loaded], kv_blocks=64, cuda_graphs=graphs)
    bad, bad_ev = start(engine, "A", [1, 50, 60])
    engine.sessions[bad].request.plan.edits[3].append(Exploding(3, None, None))
    _, long_ev = start(engine, "B", LONG)
    _, short_ev = start(engine, "B", SHORT)
    finish(engine)
    assert isinstance(error(bad_ev), djinn.InternalError) and "broke the step" in str(error(bad_ev))
    assert (result(long_ev), result(short_ev)) == references
    # a resumed row rejoins a failing step with its saved state and still gets its own tokens
    engine = Engine([loaded], kv_blocks=64, cuda_graphs=graphs)
    paused, paused_ev = start(engine, "B", LONG, breakpoints=[djinn.Breakpoint("blocks.2.hook_resid_post")])
    finish(engine)
    engine.resume(paused, "B")
    bad, bad_ev = start(engine, "A", [1, 50, 60])
    engine.sessions[bad].request.plan.edits[3].append(Exploding(3, None, None))
    finish(engine)
    assert isinstance(error(bad_ev), djinn.InternalError)
    assert result(paused_ev) == references[0]


def test_an_engine_fault_fails_every_row_and_the_engine_keeps_serving(loaded, references):
    engine = Engine([loaded], kv_blocks=64)
    model = engine.workers["stories260K"].model
    original = model.unembed
    model.unembed = lambda x: (_ for _ in ()).throw(RuntimeError("device fault"))
    _, a = start(engine, "A", LONG)
    _, b = start(engine, "B", SHORT)
    finish(engine)
    assert all("device fault" in str(error(ev)) for ev in (a, b))
    model.unembed = original
    _, long_ev = start(engine, "B", LONG)
    _, short_ev = start(engine, "B", SHORT)
    finish(engine)
    assert (result(long_ev), result(short_ev)) == references


# ---------------------------------------------------------------------------- sharing the pool

def test_idle_sessions_expire_and_say_so(loaded):
    engine = Engine([loaded], kv_blocks=64, idle_ttl=0.2)
    idle, ev = start(engine, "A", SHORT, n=2)
    finish(engine)
    kept = engine.create_session("A")
    blocks = engine.pool_usage()["stories260K"]["device_used"]
    time.sleep(0.15)
    engine.session_info(kept, "A")  # any call of its owner keeps a session alive
    time.sleep(0.15)
    engine.housekeeping()
    with pytest.raises(djinn.SessionExpired, match="idle longer"):
        engine.session_info(idle, "A")
    with pytest.raises(djinn.UnknownSession):  # another key learns nothing about it
        engine.session_info(idle, "B")
    assert engine.session_info(kept, "A").n_tokens == 0
    assert engine.pool_usage()["stories260K"]["device_used"] < blocks


def test_one_key_holds_at_most_its_share_of_the_pool(loaded):
    # 16 device + 16 host blocks, half each key's: 16 blocks; a 40-token call on 16-token blocks needs 3
    engine = Engine([loaded], kv_blocks=16, host_kv_blocks=16, kv_share_per_key=0.5)
    held = []
    with pytest.raises(djinn.LimitExceeded, match="of its 16"):
        for _ in range(8):
            sid, ev = start(engine, "A", LONG[:30], n=10)
            finish(engine)
            result(ev)
            held.append(sid)
    assert len(held) == 5 and engine.blocks_held(engine.workers["stories260K"], "A") == 15
    with pytest.raises(djinn.LimitExceeded):  # a checkpoint's host copy counts too
        engine.checkpoint(held[0], "A")
    _, b = start(engine, "B", LONG)  # the other key still gets all it needs
    finish(engine)
    assert len(result(b)) == N
    engine.close_session(held[0], "A")
    sid, ev = start(engine, "A", LONG[:30], n=10)
    finish(engine)
    assert len(result(ev)) == 10


def test_a_request_that_fits_waits_for_memory_and_then_runs(loaded, references):
    # 4 device blocks, no host pool: a paused session holding 3 of them cannot be swapped out
    engine = Engine([loaded], kv_blocks=4, host_kv_blocks=0, queue_timeout=30.0)
    holder, held_ev = start(engine, "A", LONG, breakpoints=[djinn.Breakpoint("blocks.0.hook_resid_post")])
    finish(engine)
    assert isinstance(held_ev[-1], djinn.Paused)
    waiter, wait_ev = start(engine, "B", LONG)
    for _ in range(3):
        engine.housekeeping()
        finish(engine)
    assert wait_ev == [] and engine.session_info(waiter, "B").queue_position == 1
    assert engine.pool_usage()["stories260K"]["waiting"] == 1
    engine.close_session(holder, "A")
    engine.housekeeping()
    finish(engine)
    assert result(wait_ev) == references[0]
    assert engine.session_info(waiter, "B").queue_position is None


def test_a_waiting_request_times_out_with_a_clear_error(loaded):
    engine = Engine([loaded], kv_blocks=4, host_kv_blocks=0, queue_timeout=0.2)
    _, held_ev = start(engine, "A", LONG, breakpoints=[djinn.Breakpoint("blocks.0.hook_resid_post")])
    finish(engine)
    waiter, wait_ev = start(engine, "B", LONG)
    finish(engine)
    time.sleep(0.3)
    engine.housekeeping()
    assert isinstance(error(wait_ev), djinn.CapacityError) and "waited" in str(error(wait_ev))
    assert engine.session_info(waiter, "B").n_tokens == 0
    assert isinstance(held_ev[-1], djinn.Paused)  # the session holding the memory is untouched

"""The engine queues a step before it reads the tokens of the one before: rows continue from sampled ids
still on the device, and a call that turns out to have stopped has its queued row dropped without trace."""
import pytest
import torch

import djinn
from djinn.engine.engine import Engine
from djinn.models.loading import load_model

PROMPT = [1, 403, 9, 30, 55, 97]


@pytest.fixture(scope="module")
def loaded(stories_path):
    return load_model(str(stories_path))


def run(engine, sid, prompt, drain_each=False, **kw):
    events = []
    engine.generate(sid, "u", prompt, events.append, **kw)
    while engine.has_work():
        engine.step()
        if drain_each:  # read every step before queueing the next: no row is ever dropped
            engine.drain()
    return events


def test_a_step_is_queued_before_the_previous_one_is_read(loaded):
    engine = Engine([loaded], block_size=16)
    worker = engine.workers["stories260K"]
    sid = engine.create_session("u")
    events = []
    engine.generate(sid, "u", PROMPT, events.append, max_new_tokens=4, stop_tokens=[])
    engine.step()  # the prompt: its token is sampled but not read yet
    assert events == [] and worker.sessions[sid].request.pending == (0, len(PROMPT))
    engine.step()  # the next row feeds that token from the device; only then is it read and sent
    assert [type(e).__name__ for e in events] == ["Token"]
    assert worker.sessions[sid].kv_len == len(PROMPT)
    engine.drain()
    assert [type(e).__name__ for e in events] == ["Token", "Token"]
    assert worker.sessions[sid].kv_len == len(PROMPT) + 1


@pytest.mark.parametrize("stop_index", [0, 3, 10])  # 10: the dropped row writes position 16, a new block
def test_a_stop_token_drops_the_row_queued_after_it(loaded, stop_index):
    engine = Engine([loaded], block_size=16)
    pool = engine.workers["stories260K"].pool
    free = run(engine, engine.create_session("u"), PROMPT, max_new_tokens=16, stop_tokens=[])[-1].result
    stop_at = free.token_ids[stop_index]
    first = free.token_ids.index(stop_at)
    assert first == stop_index  # the model is fixed: these tokens do not occur earlier

    sid = engine.create_session("u")
    base = pool.device_blocks.n_used
    bp = djinn.Breakpoint("blocks.1.hook_resid_post", steps=[first + 1])  # due in the dropped row only
    events = run(engine, sid, PROMPT, max_new_tokens=16, stop_tokens=[stop_at], breakpoints=[bp])
    assert not any(isinstance(e, djinn.Paused) for e in events), "a dropped row announced its pause"
    result = events[-1].result
    assert result.finish_reason == "stop" and result.token_ids == free.token_ids[: first + 1]
    s = engine.sessions[sid]
    assert s.kv_len == len(PROMPT) + first  # the stop token itself is not in the cache yet
    assert pool.device_blocks.n_used - base == pool.blocks_for(s.kv_len), "the dropped row's block was kept"

    # the session continues exactly like one whose steps were read one at a time
    after = run(engine, sid, [], max_new_tokens=8, stop_tokens=[], return_logits=True)[-1].result
    ref = engine.create_session("u")
    run(engine, ref, PROMPT, drain_each=True, max_new_tokens=16, stop_tokens=[stop_at])
    clean = run(engine, ref, [], drain_each=True, max_new_tokens=8, stop_tokens=[], return_logits=True)[-1].result
    assert after.token_ids == clean.token_ids and torch.equal(after.logits, clean.logits)


def test_commands_between_steps_see_settled_sessions(loaded):
    """A call that finished in the step in flight is done for any command that follows a drain."""
    engine = Engine([loaded], block_size=16)
    sid = engine.create_session("u")
    events = []
    engine.generate(sid, "u", PROMPT, events.append, max_new_tokens=1, stop_tokens=[])
    engine.step()
    assert engine.has_work()  # the step in flight is still work
    with pytest.raises(djinn.SessionBusy):
        engine.generate(sid, "u", [5], events.append, max_new_tokens=1)
    engine.drain()
    assert isinstance(events[-1], djinn.Done)
    engine.generate(sid, "u", [5], events.append, max_new_tokens=1)  # accepted now


def test_greedy_runs_match_one_step_at_a_time(loaded):
    """Overlapped steps give the tokens and logits of steps read one by one (drained after every step)."""
    outs = []
    for drain_each in (False, True):
        engine = Engine([loaded], block_size=16)
        sids = [engine.create_session("u") for _ in range(3)]
        events = {sid: [] for sid in sids}
        for k, sid in enumerate(sids):
            engine.generate(sid, "u", PROMPT[: 3 + k], events[sid].append, max_new_tokens=10 + 3 * k,
                            stop_tokens=[], return_logits=True, temperature=0.8, seed=k)
        while engine.has_work():
            engine.step()
            if drain_each:
                engine.drain()
        outs.append([events[sid][-1].result for sid in sids])
    for a, b in zip(*outs):
        assert a.token_ids == b.token_ids and torch.equal(a.logits, b.logits)

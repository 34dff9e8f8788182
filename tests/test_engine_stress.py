"""A seeded random mix of generate, pause, resume, fork (also mid-forward), checkpoint, restore and close on
a KV pool too small for everyone: every completed call equals a clean run of the same history, and once
everything is closed no block is left allocated."""
import random

import pytest

import djinn
from djinn.engine.engine import Engine
from djinn.models.loading import load_model

PROMPTS = ["Once upon a time", " The dog", " She was happy.", " Then", " One day, a little girl", ""]
SITES = ["hook_embed", "blocks.0.attn.hook_z", "blocks.1.hook_resid_mid", "blocks.2.hook_mlp_out",
         "blocks.4.hook_resid_post", "ln_final.hook_out"]


@pytest.mark.parametrize("seed", [0, 1])
def test_random_operations_stay_correct_and_leak_nothing(stories_path, seed):
    rng = random.Random(seed)
    loaded = load_model(str(stories_path))
    engine = Engine([loaded], kv_blocks=24, host_kv_blocks=400, block_size=16, pause_ttl=1e9)
    pool = engine.workers["stories260K"].pool
    reserved = engine.workers["stories260K"].reserved_blocks  # the graphs' scratch block, when graphs are on
    owner = "u"
    events: dict[str, list] = {}
    calls = []  # (history the call started from, tokens it generated)
    sessions, checkpoints = [], []
    started: dict[str, list[int]] = {}

    def sink_for(sid):
        events[sid] = []
        return events[sid].append

    def collect():
        for sid, evs in events.items():
            for ev in evs:
                if isinstance(ev, djinn.Done):
                    calls.append((started.pop(sid), ev.result.token_ids))
                assert not isinstance(ev, djinn.Error), ev.error
            evs.clear()

    for _ in range(12):
        sessions.append(engine.create_session(owner))
    for it in range(220):
        sid = rng.choice(sessions)
        s = engine.sessions[sid]
        op = rng.random()
        if s.state.value == "paused":
            waiting = s.request.pause is not None and not s.request.resumed
            if waiting and op < 0.6:
                engine.resume(sid, owner)
            elif waiting and op < 0.8 and len(sessions) < 20:  # fork mid-forward; the fork gets a listener
                nid = engine.fork(sid, owner)
                sessions.append(nid)
                started[nid] = list(started[sid])
                engine.attach(nid, owner, sink_for(nid))
        elif s.state.value == "idle":
            if op < 0.6:
                prompt = rng.choice(PROMPTS) if s.history else "Once"
                if s.kv_len + 60 >= 512 or (not prompt and len(s.history) == s.kv_len):
                    prompt = " And"
                bps = []
                if rng.random() < 0.5:
                    bps = [djinn.Breakpoint(rng.choice(SITES), steps=[rng.randrange(0, 4)])]
                n = rng.randint(1, 25)
                before = len(s.history)
                engine.generate(sid, owner, prompt, sink_for(sid), max_new_tokens=n, stop_tokens=[],
                                breakpoints=bps)
                started[sid] = list(s.history)
                assert len(s.history) >= before
            elif op < 0.7 and len(sessions) < 20:
                sessions.append(engine.fork(sid, owner))
            elif op < 0.8 and s.history:
                checkpoints.append(engine.checkpoint(sid, owner))
            elif op < 0.88 and checkpoints:
                sessions.append(engine.restore(rng.choice(checkpoints), owner))
            elif op < 0.93 and len(sessions) > 4:
                engine.close_session(sid, owner)
                sessions.remove(sid)
        for _ in range(rng.randint(1, 3)):
            engine.housekeeping()
            if engine.has_work():
                engine.step()
        collect()
    # finish everything still in flight
    for _ in range(2000):
        for sid in sessions:
            s = engine.sessions[sid]
            if s.state.value == "paused" and s.request.pause is not None and not s.request.resumed:
                engine.resume(sid, owner)
        if not engine.has_work():
            break
        engine.step()
        collect()
    collect()
    assert not started, "every call finished"
    assert len(calls) > 40
    assert pool.host_blocks.n_used > 0 or not checkpoints

    # each call equals a clean run of the history it started from
    reference = Engine([loaded], kv_blocks=200, block_size=16)
    for history, generated in calls:
        sid = reference.create_session(owner)
        out = []
        reference.generate(sid, owner, history, out.append, max_new_tokens=len(generated), stop_tokens=[])
        while reference.has_work():
            reference.step()
        assert out[-1].result.token_ids == generated
        reference.close_session(sid, owner)

    for sid in sessions:
        engine.close_session(sid, owner)
    for cid in checkpoints:
        engine.delete_checkpoint(cid, owner)
    assert pool.device_blocks.n_used == reserved and pool.host_blocks.n_used == 0
    assert sorted(pool.device_blocks.refcount, reverse=True)[reserved:] == [0] * (pool.device_blocks.n_blocks - reserved)
    assert set(pool.host_blocks.refcount) == {0}

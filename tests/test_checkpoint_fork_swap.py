"""Checkpoints, restores and forks continue exactly as the original would; forks share their prefix
copy-on-write; sessions that do not fit together swap to host memory and still finish correctly."""
import threading

import pytest
import torch

import djinn


@pytest.fixture(scope="module")
def client(stories_path):
    c = djinn.connect(model=str(stories_path), block_size=16)
    yield c
    c.close()


def engine_of(client):
    return client._backend.service.engine


def test_checkpoint_restore_continues_like_the_original(client):
    s = client.session()
    s.generate("Once upon a time", max_new_tokens=21)
    ck = s.checkpoint()
    assert ck.wait()["done"]
    original = s.generate(" and then", max_new_tokens=24, return_logits=True)
    restored = ck.restore()
    again = restored.generate(" and then", max_new_tokens=24, return_logits=True)
    assert again.token_ids == original.token_ids
    assert torch.equal(again.logits, original.logits)
    # a checkpoint restores as often as wanted, and survives the original's closing
    s.close()
    third = ck.restore().generate(" and then", max_new_tokens=24)
    assert third.token_ids == original.token_ids
    ck.delete()
    with pytest.raises(djinn.UnknownCheckpoint):
        ck.restore()


def test_checkpoint_is_isolated_from_later_writes(client):
    s = client.session()
    s.generate("The dog", max_new_tokens=5)  # leaves a partly filled block that the checkpoint shares
    ck = s.checkpoint()
    after_checkpoint = s.generate([], max_new_tokens=30).token_ids  # writes into that block (copy-on-write)
    assert ck.restore().generate([], max_new_tokens=30).token_ids == after_checkpoint


def test_fork_shares_prefix_blocks_and_diverges_safely(client):
    engine = engine_of(client)
    pool = engine.workers["stories260K"].pool
    s = client.session()
    s.generate("Once upon a time, there was a big", max_new_tokens=30)  # 40 tokens: 2 full blocks + 1 partial
    blocks = list(engine.sessions[s.id].blocks)
    assert len(blocks) == 3
    used = pool.device_blocks.n_used
    f = s.fork()
    assert pool.device_blocks.n_used == used, "a fork allocates nothing until it writes"
    assert engine.sessions[f.id].blocks == blocks
    assert [pool.device_blocks.refcount[b] for b in blocks] == [2, 2, 2]

    reference = client.session()
    reference.generate("Once upon a time, there was a big", max_new_tokens=30)
    expected_a = reference.fork().generate(" cat", max_new_tokens=20, return_logits=True)
    expected_b = reference.generate(" tree", max_new_tokens=20, return_logits=True)

    out_f = f.generate(" tree", max_new_tokens=20, return_logits=True)
    out_s = s.generate(" cat", max_new_tokens=20, return_logits=True)
    # the full prefix blocks are still shared; the partial one was copied by whoever wrote first
    fb, sb = engine.sessions[f.id].blocks, engine.sessions[s.id].blocks
    assert fb[:2] == sb[:2] == blocks[:2] and fb[2] != sb[2]
    assert [pool.device_blocks.refcount[b] for b in blocks[:2]] == [2, 2]
    assert out_f.token_ids == expected_b.token_ids and torch.equal(out_f.logits, expected_b.logits)
    assert out_s.token_ids == expected_a.token_ids and torch.equal(out_s.logits, expected_a.logits)
    f.close()
    assert [pool.device_blocks.refcount[b] for b in blocks[:2]] == [1, 1]


def test_busy_sessions_refuse_checkpoint_and_fork_pauses(client):
    s = client.session()
    stream = s.stream("Hi", max_new_tokens=4, breakpoints=[djinn.Breakpoint("hook_embed")])
    assert isinstance(next(stream), djinn.Paused)
    with pytest.raises(djinn.SessionBusy):
        s.checkpoint().wait()
    paused_fork = s.fork()  # a fork made at a pause waits at the same point
    assert paused_fork.info()["state"] == "paused"
    paused_fork.close()
    stream.close()  # cancels the request; the session is idle again
    assert s.info()["state"] == "idle"
    s.fork().close()
    s.checkpoint().delete()


def test_fork_at_a_pause_shares_the_in_flight_blocks(client):
    engine = engine_of(client)
    pool = engine.workers["stories260K"].pool
    s = client.session()
    stream = s.stream("Once upon a time, there was", max_new_tokens=6,
                      breakpoints=[djinn.Breakpoint("blocks.2.hook_resid_mid", steps=[0])])
    ev = next(stream)
    in_flight = list(engine.sessions[s.id].blocks)  # layers 0-1 of the prompt are written, 2-4 are not yet
    used = pool.device_blocks.n_used
    f = s.fork()
    assert engine.sessions[f.id].blocks == in_flight and pool.device_blocks.n_used == used
    ev.resume()
    mine = [e for e in stream if isinstance(e, djinn.Done)][0].result.token_ids
    assert engine.sessions[s.id].blocks[0] != in_flight[0], "the writer copied the shared block first"
    theirs = None
    for e in f.attach():
        if isinstance(e, djinn.Paused):
            e.resume()
        elif isinstance(e, djinn.Done):
            theirs = e.result.token_ids
    assert mine == theirs == client.session().generate("Once upon a time, there was", max_new_tokens=6).token_ids


def test_swap_lets_more_sessions_run_than_fit(stories_path):
    prompts = ["The dog", "A girl", "Tim saw", "One day", "The sun", "Lily had", "Ben and", "The bird"]
    with djinn.connect(model=str(stories_path)) as roomy:
        expected = [roomy.session().generate(p, max_new_tokens=60).token_ids for p in prompts]
    # 64 tokens a session need 4-5 blocks each; 12 blocks hold two sessions at a time, not eight
    with djinn.connect(model=str(stories_path), kv_blocks=12, host_kv_blocks=64, block_size=16) as tight:
        engine = engine_of(tight)
        sessions = [tight.session() for _ in prompts]
        results = [None] * len(prompts)

        def run(i):
            results[i] = sessions[i].generate(prompts[i], max_new_tokens=60).token_ids
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert results == expected
        assert engine.pool_usage()["stories260K"]["host_used"] > 0, "some sessions must have been swapped out"
        # swapped sessions come back before they run, and continue correctly
        again = [s.generate(" The end.", max_new_tokens=5).token_ids for s in sessions]
        assert all(len(a) > 0 for a in again)


def test_request_that_can_never_fit_gets_a_clear_error(stories_path):
    with djinn.connect(model=str(stories_path), kv_blocks=4, block_size=16) as c:
        s = c.session()
        with pytest.raises(djinn.CapacityError, match="never fit"):
            s.generate("Once upon a time", max_new_tokens=100)
        assert len(s.generate("Once upon a time", max_new_tokens=20).token_ids) == 20


def test_block_moves_copy_runs_of_consecutive_blocks():
    """Moves between the pools copy each stretch of consecutive blocks at once; any order of ids (a
    fragmented free list) still lands every block where it belongs."""
    from djinn.engine.kv_pool import KVPool, runs
    from djinn.models.config import ModelConfig

    assert runs([4, 5, 6, 9, 3, 4], [0, 1, 2, 3, 7, 8]) == [(4, 0, 3), (9, 3, 1), (3, 7, 2)]
    assert runs([], []) == []
    cfg = ModelConfig(family="llama", vocab_size=32, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_mlp=32,
                      max_seq_len=64)
    pool = KVPool(cfg, 12, 12, 4, torch.float32, torch.device("cpu"))
    pool.kv.copy_(torch.randn(pool.kv.shape, generator=torch.Generator().manual_seed(0)))
    device_ids, host_ids = [3, 4, 5, 0, 11, 10, 6, 7], [2, 3, 4, 5, 0, 1, 9, 10]
    pool.to_host(device_ids, host_ids).wait()
    for d, h in zip(device_ids, host_ids):
        assert torch.equal(pool.host[h], pool.kv[d])
    back = [1, 2, 8, 9, 3, 4, 5, 0]
    pool.to_device(host_ids, back)
    for d, b in zip(device_ids, back):
        assert torch.equal(pool.kv[b], pool.host[host_ids[device_ids.index(d)]])


def test_freed_blocks_come_back_in_order():
    from djinn.engine.kv_pool import BlockAllocator

    a = BlockAllocator(16)
    first = a.allocate(6)
    assert first == [0, 1, 2, 3, 4, 5]
    a.decref(first[2:5])
    assert a.allocate(3) == [2, 3, 4]


def test_sessions_stay_in_few_stretches_after_others_come_and_go(client):
    """The allocator hands out the lowest free blocks first: after sessions of all lengths came and went, a
    session's blocks still form one stretch, so its checkpoint is one copy."""
    import random

    from djinn.engine.kv_pool import runs

    rnd = random.Random(0)
    for _ in range(6):
        sessions = [client.session() for _ in range(rnd.randint(1, 3))]
        for s in sessions:
            s.generate(list(range(1, rnd.randint(20, 200))), max_new_tokens=rnd.randint(1, 20))
        blocks = engine_of(client).sessions[sessions[0].id].blocks
        assert len(runs(blocks, list(range(len(blocks))))) == 1, blocks
        for s in sessions:
            s.close()

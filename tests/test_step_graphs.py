"""The CUDA graphs' path, run on the CPU with nothing captured: steps (prompts and decode) cut into segments
at pauses, captures and re-entering rows give exactly what the eager runner gives."""
import threading

import pytest
import torch

import djinn

PROMPT = "Once upon a time, there was a dog"
SITES = ["blocks.1.hook_resid_pre", "blocks.2.attn.hook_z", "blocks.2.hook_attn_out", "blocks.3.hook_resid_mid",
         "blocks.3.hook_mlp_out", "ln_final.hook_out"]


@pytest.fixture(scope="module")
def clients(stories_path):
    graphs = djinn.connect(model=str(stories_path), cuda_graphs=True)
    eager = djinn.connect(model=str(stories_path), cuda_graphs=False)
    yield graphs, eager
    graphs.close()
    eager.close()


def segments(client) -> list[tuple]:
    worker = next(iter(client._backend.service.engine.workers.values()))
    return list(worker.runner.graphs._graphs)


def run(session, site=None, steps="all", edit=None, n=10, **kw):
    bps = [djinn.Breakpoint(site, steps=steps)] if site else []
    pauses = []
    for ev in session.stream(PROMPT, max_new_tokens=n, return_logits=True, breakpoints=bps, **kw):
        if isinstance(ev, djinn.Paused):
            pauses.append((ev.step, ev.activation.clone()))
            ev.resume(edit(ev.activation) if edit else None)
        elif isinstance(ev, djinn.Done):
            return ev.result, pauses
    raise AssertionError("no Done event")


@pytest.mark.parametrize("site", SITES)
def test_pauses_on_segments_are_bit_identical(clients, site):
    graphs, eager = clients
    ref, _ = run(graphs.session())
    out, pauses = run(graphs.session(), site, steps=[0, 2, 3, 9])
    assert [p[0] for p in pauses] == [0, 2, 3, 9]
    assert out.token_ids == ref.token_ids
    assert torch.equal(out.logits, ref.logits)
    # the same activations as the eager runner shows at those pauses
    _, eager_pauses = run(eager.session(), site, steps=[0, 2, 3, 9])
    for (_, a), (_, b) in zip(pauses, eager_pauses):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # the step really was cut: a segment starting after the pause site exists
    index = {s.name: s.index for s in next(iter(graphs._backend.service.engine.workers.values())).sites.sites}
    canonical = index.get(site, index["blocks.0.hook_resid_post"] if site == "blocks.1.hook_resid_pre" else None)
    assert any(key.first == canonical + 1 for key in segments(graphs))


def test_edited_resume_captures_and_edits_match_eager(clients):
    graphs, eager = clients
    d = graphs.models()[0].d_model
    vec = torch.randn(d, generator=torch.Generator().manual_seed(0))
    items = [djinn.Steer("blocks.2.hook_resid_post", vec, scale=0.5, steps=[0, 1, 2, 3, 4]),
             djinn.Scale("blocks.1.hook_mlp_out", 0.5),
             djinn.Replace("blocks.0.hook_resid_post", torch.randn(3, d), positions=[2, 5, 13]),
             djinn.Capture("blocks.*.hook_resid_post", steps=[0, 3, 4]),
             djinn.Capture("ln_final.hook_out", steps=[4])]
    results = []
    for c in (graphs, eager):
        out, pauses = run(c.session(), "blocks.3.hook_resid_mid", steps=[0, 2, 4], edit=lambda a: a * 0.5,
                          interventions=items)
        results.append((out, pauses))
    (g, gp), (e, ep) = results
    assert g.token_ids == e.token_ids
    torch.testing.assert_close(g.logits, e.logits, rtol=0, atol=1e-4)
    n_layers = graphs.models()[0].n_layers
    assert sorted(g.captures) == sorted(e.captures) and len(g.captures) == n_layers * 3 + 1
    for k in g.captures:
        torch.testing.assert_close(g.captures[k], e.captures[k], rtol=0, atol=1e-4)
    plain, _ = run(graphs.session(), interventions=items)
    assert g.token_ids != plain.token_ids or not torch.equal(g.logits, plain.logits)  # the edit at the pause counted


def test_neighbours_of_a_paused_row_are_unaffected(clients):
    """Three sessions decode together; one pauses at every step. The others get their solo tokens."""
    graphs, _ = clients
    solo = {p: graphs.session().generate(p, max_new_tokens=12).token_ids for p in ("The cat", "A bird")}
    results, ready = {}, threading.Barrier(3)

    def other(prompt):
        ready.wait()
        results[prompt] = graphs.session().generate(prompt, max_new_tokens=12).token_ids

    threads = [threading.Thread(target=other, args=(p,)) for p in solo]
    for t in threads:
        t.start()
    ready.wait()
    out, pauses = run(graphs.session(), "blocks.2.hook_resid_post", steps="all", n=12)
    for t in threads:
        t.join(timeout=60)
    assert len(pauses) == 12  # the prefill and 11 decode steps
    assert results == solo
    ref, _ = run(graphs.session(), n=12)
    assert out.token_ids == ref.token_ids


def test_prompts_of_several_sessions_share_a_step(clients):
    """Sessions submitted together prefill in one step (several rows of many tokens, padded); one pauses in
    its prompt and is resumed with an edit. Each gets what it gets alone on the eager runner."""
    graphs, eager = clients
    prompts = ["The cat sat", "Once upon a time, there was a little", "A bird"]
    service = graphs._backend.service
    owner = graphs._backend.owner
    results: dict[int, list] = {}
    done = threading.Event()

    def sink_for(k):
        def sink(ev):
            if isinstance(ev, djinn.Paused):  # the engine thread: resume through the queue, edited
                service.post("resume", sids[k], owner, ev.activation * 0.5, ev.pause_id)
            elif isinstance(ev, djinn.Done):
                results[k] = ev.result.token_ids
                if len(results) == len(prompts):
                    done.set()
        return sink
    sids = [service.call("create_session", owner) for _ in prompts]
    futures = [service.post("generate", sid, owner, graphs.tokenize(p), sink_for(k), max_new_tokens=6,
                            stop_tokens=[], breakpoints=[djinn.Breakpoint("blocks.2.hook_mlp_out", steps=[0])]
                            if k == 1 else [])
               for k, (sid, p) in enumerate(zip(sids, prompts))]
    for f in futures:
        f.result()
    assert done.wait(60)
    for k, p in enumerate(prompts):
        bps = [djinn.Breakpoint("blocks.2.hook_mlp_out", steps=[0])] if k == 1 else []
        ref = []
        for ev in eager.session().stream(eager.tokenize(p), max_new_tokens=6, stop_tokens=[], breakpoints=bps):
            if isinstance(ev, djinn.Paused):
                ev.resume(ev.activation * 0.5)
            elif isinstance(ev, djinn.Token):
                ref.append(ev.token_id)
        assert results[k] == ref
    multi_row = [key for key in segments(graphs) if (key.rows or 0) > 1]  # prompts shared a step
    assert multi_row


def test_a_prompt_paused_alone_runs_each_layer_once(clients, monkeypatch):
    """The pausing step replays only the segment up to the pause, the resumed step only the one after it."""
    graphs, _ = clients
    worker = next(iter(graphs._backend.service.engine.workers.values()))
    segments_run = []
    forward = worker.runner.graphs._forward

    def counted(key):
        segments_run.append((key.first, key.last))
        return forward(key)
    monkeypatch.setattr(worker.runner.graphs, "_forward", counted)
    site = worker.sites.resolve("blocks.2.hook_resid_post")[0][1].index
    out, pauses = run(graphs.session(), "blocks.2.hook_resid_post", steps=[0], n=1)
    assert len(pauses) == 1 and len(out.token_ids) == 1
    assert segments_run == [(0, site), (site + 1, len(worker.sites.sites) - 1)]


def test_a_lone_pause_loads_its_resumed_step_ahead(clients, monkeypatch):
    """While the client of a lone paused row thinks, its resumed step's inputs go to the device; the resume
    then only launches. Another step in between replaces them, and the resume loads its own again."""
    graphs, _ = clients
    worker = next(iter(graphs._backend.service.engine.workers.values()))
    g = worker.runner.graphs
    loads = []
    load_inputs = g._load_inputs

    def counted(plan, tb, *kept_scores):
        loads.append(tuple(s.first for s in plan.sites))
        return load_inputs(plan, tb, *kept_scores)
    monkeypatch.setattr(g, "_load_inputs", counted)
    site = worker.sites.resolve("blocks.2.hook_resid_post")[0][1].index
    ref, _ = run(graphs.session(), n=4)
    loads.clear()
    out, _ = run(graphs.session(), "blocks.2.hook_resid_post", steps=[0], n=4)
    assert out.token_ids == ref.token_ids and torch.equal(out.logits, ref.logits)
    assert loads[:2] == [(0,), (site + 1,)] and loads.count((site + 1,)) == 1  # loaded ahead, not again

    loads.clear()
    tokens, other = [], None
    for ev in graphs.session().stream(PROMPT, max_new_tokens=4, return_logits=True,
                                      breakpoints=[djinn.Breakpoint("blocks.2.hook_resid_post", steps=[0])]):
        if isinstance(ev, djinn.Paused):
            other = graphs.session().generate("The cat", max_new_tokens=3).token_ids  # its steps load in between
            ev.resume()
        elif isinstance(ev, djinn.Done):
            tokens, logits = ev.result.token_ids, ev.result.logits
    assert tokens == ref.token_ids and torch.equal(logits, ref.logits)
    assert other == graphs.session().generate("The cat", max_new_tokens=3).token_ids
    assert loads.count((site + 1,)) == 2  # ahead, replaced by the other session's steps, loaded again


def test_decode_steps_are_recorded_at_start_and_never_again(stories_path):
    from djinn.engine.cuda_graphs import BUCKETS

    client = djinn.connect(model=str(stories_path), cuda_graphs=True)
    try:
        stats = client._backend.service.engine.stats
        assert stats.graphs_recorded == len(BUCKETS)  # one whole-forward decode graph a padded row count
        decode_keys = set(segments(client))
        assert {key.tokens for key in decode_keys} == set(BUCKETS) and all(key.rows is None for key in decode_keys)
        first = client.session()
        first.generate(PROMPT, max_new_tokens=2)
        after_prompt = stats.graphs_recorded  # the prompt's step, a segment of its own
        assert after_prompt == len(BUCKETS) + 1
        # prompts already seen, then decode steps of 3, 2 and 1 rows as the sessions finish one by one
        sessions = [client.session() for _ in range(3)]
        for s in sessions:
            s.generate(PROMPT, max_new_tokens=1)
        streams = [s.stream(" and", max_new_tokens=n) for s, n in zip(sessions, (4, 8, 12))]
        ends = []
        threads = [threading.Thread(target=lambda st=st: ends.append(list(st)[-1])) for st in streams]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(isinstance(e, djinn.Done) for e in ends) and len(ends) == 3
        new = set(segments(client)) - decode_keys
        assert all(key.rows is not None for key in new)  # only prompt steps (rows bucketed) were recorded since
        assert stats.graphs_recorded == len(decode_keys) + len(new)
    finally:
        client.close()


def test_a_prompt_step_without_its_graphs_runs_uncaptured_and_they_are_recorded_when_idle(stories_path):
    """As on a GPU, where a capture costs several forwards: a step with prompts does not wait for its
    segments (their forward runs uncaptured on the graphs' buffers); the engine records them when it has
    nothing to run, and the same batch shape replays them, with the same bits."""
    import time

    client = djinn.connect(model=str(stories_path), cuda_graphs=True)
    try:
        (worker,) = client._backend.service.engine.workers.values()
        runner, graphs = worker.runner, worker.runner.graphs
        graphs.record_later = True
        eager, recorded = [], []
        run_eagerly, segment = runner._run_eagerly, graphs._segment
        runner._run_eagerly = lambda plan, out: (eager.append(plan), run_eagerly(plan, out))
        graphs._segment = lambda key: (recorded.append((key, worker.has_work())), segment(key))
        first = client.session().generate(PROMPT, max_new_tokens=4, return_logits=True)
        deadline = time.monotonic() + 10
        while graphs.has_pending() and time.monotonic() < deadline:
            time.sleep(0.01)
        prompt_keys = [(key, busy) for key, busy in recorded if key.rows is not None]
        assert len(prompt_keys) == 1 and not prompt_keys[0][1]  # recorded once, with nothing to run
        again = client.session().generate(PROMPT, max_new_tokens=4, return_logits=True)
        assert not eager  # both prompt steps went through the graphs' executor
        assert len([key for key, _ in recorded if key.rows is not None]) == 1  # replayed, not recorded again
        assert again.token_ids == first.token_ids and torch.equal(again.logits, first.logits)
    finally:
        client.close()

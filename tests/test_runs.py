"""Many prompts in one call: `client.run` / `run_iter` against per-prompt sessions, embedded and over a
loopback server; bounded memory, nothing left behind, the early stop of forward-only runs, activation
patching against a hand-rolled loop of patched generate calls, and sessions found again by id.

Results of a run are batched with each other, so captures equal a lone prompt's within the float32
rounding of a different batch (README: 1e-4 here); tokens are identical.
"""
from __future__ import annotations

import time

import pytest
import torch

import djinn
import djinn.patching as patching
from djinn import Item
from djinn.engine.engine import Engine
from djinn.models.loading import load_model
from djinn.server.launch import ServerThread
from djinn.server.limits import Limits

from serverutil import WAIT

TOL = 1e-4
SITE = "blocks.1.hook_resid_post"
PROMPTS = ["Once upon a time", [1, 40, 50, 60, 70, 80, 90, 100, 200], "The little dog ran to the park and",
           [1, 7], "Tom had a red ball"]


@pytest.fixture(scope="module")
def loaded(stories_path):
    return load_model(str(stories_path), "float32", "cpu")


@pytest.fixture(scope="module")
def client(loaded):
    from djinn.client.api import Client
    from djinn.client.embedded import EmbeddedBackend

    c = Client(EmbeddedBackend(Engine([loaded])))
    yield c
    c.close()


@pytest.fixture(scope="module")
def server(loaded):
    srv = ServerThread(Engine([loaded]), startup_timeout=WAIT)
    yield srv
    srv.stop()


def _engine(client) -> Engine:
    return client._backend.service.engine


def _alone(client, prompt, **params):
    with client.session() as s:
        return s.generate(prompt, **params)


def test_run_equals_generate_prompt_by_prompt(client):
    items = [djinn.Capture(SITE), djinn.Capture("blocks.0.attn.hook_pattern"), djinn.LogitLens(SITE, top_k=3),
             djinn.Steer("blocks.0.hook_resid_post", torch.full((client.models()[0].d_model,), 0.05))]
    res = client.run(PROMPTS, max_new_tokens=4, interventions=items, return_logits=True, stop_tokens=[])
    assert len(res) == len(PROMPTS)
    for prompt, got in zip(PROMPTS, res):
        want = _alone(client, prompt, max_new_tokens=4, interventions=items, return_logits=True, stop_tokens=[])
        assert got.token_ids == want.token_ids and got.text == want.text
        assert (got.logits - want.logits).abs().max() <= TOL
        assert sorted(got.captures) == sorted(want.captures)
        for key, value in want.captures.items():
            assert (got.captures[key] - value).abs().max() <= TOL, key
        assert all(torch.equal(got.lens[k].ids, v.ids) for k, v in want.lens.items())
    assert client.sessions() == [] and not _engine(client).sessions


def test_interventions_of_each_prompt(client):
    d = client.models()[0].d_model
    own = [[djinn.Steer(SITE, torch.full((d,), float(k)))] for k in range(len(PROMPTS))]
    res = client.run(PROMPTS, max_new_tokens=3, interventions=own, stop_tokens=[], return_logits=True)
    for prompt, mine, got in zip(PROMPTS, own, res):
        want = _alone(client, prompt, max_new_tokens=3, interventions=mine, stop_tokens=[], return_logits=True)
        assert got.token_ids == want.token_ids and (got.logits - want.logits).abs().max() <= TOL
    shared = [djinn.Capture(SITE)]
    res = client.run([Item(p, m) for p, m in zip(PROMPTS, own)], max_new_tokens=0, interventions=shared)
    assert all((SITE, 0) in r.captures for r in res)
    with pytest.raises(djinn.DjinnError, match="2 lists of interventions for 5 prompts"):
        client.run(PROMPTS, interventions=own[:2])


def test_stack_pads_every_prompt_to_the_longest(client):
    res = client.run(PROMPTS, interventions=[djinn.Capture(SITE), djinn.Capture("blocks.1.attn.hook_pattern")])
    lengths = [len(client.tokenize(p)) if isinstance(p, str) else len(p) for p in PROMPTS]
    values, got = res.stack(SITE)
    assert got.tolist() == lengths and values.shape == (len(PROMPTS), max(lengths), client.models()[0].d_model)
    for i, n in enumerate(lengths):
        assert torch.equal(values[i, :n], res[i].captures[(SITE, 0)]) and not values[i, n:].any()
    pattern, got = res.stack("blocks.1.attn.hook_pattern")  # [n_heads, T, T]: tokens are its second dimension
    assert got.tolist() == lengths and pattern.shape[2:] == (max(lengths), max(lengths))


def test_run_iter_yields_a_thousand_results_once_in_order_with_bounded_memory(client, monkeypatch):
    engine = _engine(client)
    runs = engine.runs
    most = {"live": 0, "sessions": 0}
    real = runs.feed

    def feed(rid, owner, items, last=False):
        real(rid, owner, items, last)
        run = runs.runs.get(rid)
        most["live"] = max(most["live"], len(run.live) if run else 0)
        most["sessions"] = max(most["sessions"], len(engine.sessions))
    monkeypatch.setattr(runs, "feed", feed)
    embed = client.weight("W_E")
    prompts = ([5 + i % 50] * (1 + i % 7) for i in range(1000))  # a generator: no length known
    seen = 0
    for i, out in enumerate(client.run_iter(prompts, window=32, interventions=[djinn.Capture("hook_embed")])):
        ids = [5 + i % 50] * (1 + i % 7)
        assert torch.equal(out.captures[("hook_embed", 0)], embed[ids])  # the i-th prompt's, in order
        if i % 100 == 0:
            time.sleep(0.05)  # a slow reader: the feed waits, the engine holds no more
        seen += 1
    assert seen == 1000
    assert most["live"] <= 32 and most["sessions"] <= 32
    assert not engine.sessions and not runs.runs


def test_a_forward_only_run_stops_after_its_last_capture(client, monkeypatch):
    runner = next(iter(_engine(client).workers.values())).runner
    layers = []
    real = runner.compute_site
    monkeypatch.setattr(runner, "compute_site", lambda site, *a, **k: (layers.append(site.layer), real(site, *a, **k))[1])
    res = client.run(PROMPTS, interventions=[djinn.Capture("blocks.0.hook_resid_post")])
    assert max(layers) == 0 and all((("blocks.0.hook_resid_post", 0)) in r.captures for r in res)
    layers.clear()
    client.run(PROMPTS[:1], interventions=[djinn.Capture("blocks.0.hook_resid_post")], return_logits="all")
    assert max(layers) == len(runner.model.blocks)  # logits asked for: the whole forward (the final norm)
    with client.session() as s:  # a session that lives on keeps its whole cache
        layers.clear()
        s.generate(PROMPTS[0], max_new_tokens=0, interventions=[djinn.Capture("blocks.0.hook_resid_post")])
        assert max(layers) == len(runner.model.blocks)


def test_a_failing_prompt_ends_the_run_naming_it_and_loses_nothing(client):
    with client.session() as mine:
        before = mine.generate("Once upon", max_new_tokens=3, stop_tokens=[]).token_ids
        with pytest.raises(djinn.TokenOutOfRange, match="prompt 2"):
            client.run(["a", "b", [1, 10**6]], max_new_tokens=8)
        with pytest.raises(djinn.InvalidRequest, match="breakpoints"):
            client.run(["a"], breakpoints=[djinn.Breakpoint(SITE)])
        with pytest.raises(djinn.UnknownSite):
            client.run(["a"], interventions=[djinn.Capture("blocks.0.hook_nope")])
        with pytest.raises(djinn.InvalidRequest, match="window"):
            client.run(["a"], window=0)
        assert not _engine(client).sessions.keys() - {mine.id} and not _engine(client).runs.runs
        assert mine.generate(max_new_tokens=2, stop_tokens=[]).token_ids  # the session carries on
    again = client.run(["Once upon"], max_new_tokens=3, stop_tokens=[])[0].token_ids
    assert again == before


def test_a_run_checks_its_parameters_at_its_start_and_numbers_its_prompts_as_fed(client):
    from djinn.engine.runs import RunItem

    service, owner = client._backend.service, client._backend.owner
    engine = _engine(client)
    with pytest.raises(djinn.InvalidRequest, match="temperature"):  # before any prompt is fed
        service.call("start_run", owner, None, lambda ev: None, 8, {"max_new_tokens": 2, "temperature": -1.0})
    assert not engine.runs.runs
    events = []
    rid = service.call("start_run", owner, None, events.append, 8, {"max_new_tokens": 0})
    service.call("feed_run", rid, owner, [RunItem(0, [1, 5, 6])])
    for items in ([RunItem(1, [1, 7]), RunItem(1, [1, 8])], [RunItem(0, [1, 9])], [RunItem(2, [1, 9])]):
        held = set(engine.sessions)
        with pytest.raises(djinn.InvalidRequest, match="must be 1 to"):
            service.call("feed_run", rid, owner, items)
        assert set(engine.sessions) <= held  # nothing of the refused feed started
    service.call("feed_run", rid, owner, [RunItem(1, [1, 7])], True)
    deadline = time.monotonic() + 10
    while not events or type(events[-1]).__name__ != "RunDone":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert sorted(ev.index for ev in events[:-1]) == [0, 1]
    assert not engine.runs.runs
    while engine.sessions:  # the answered prompts' sessions close between steps
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_leaving_run_iter_early_cancels_the_rest(client):
    engine = _engine(client)
    base = engine.pool_usage()
    it = client.run_iter(["Once upon a time"] * 200, window=16, max_new_tokens=40, stop_tokens=[])
    next(it)
    it.close()
    assert not engine.sessions and not engine.runs.runs
    assert engine.pool_usage() == base


def test_remote_runs_equal_embedded_and_a_dropped_client_frees_everything(server, client):
    remote = djinn.connect(server.url)
    items = [djinn.Capture(SITE), djinn.LogitLens(SITE, top_k=2)]
    got = remote.run(PROMPTS, max_new_tokens=3, interventions=items, stop_tokens=[], return_logits=True)
    want = client.run(PROMPTS, max_new_tokens=3, interventions=items, stop_tokens=[], return_logits=True)
    for a, b in zip(got, want):
        assert a.token_ids == b.token_ids and (a.logits - b.logits).abs().max() <= TOL
        assert (a.captures[(SITE, 0)] - b.captures[(SITE, 0)]).abs().max() <= TOL
    assert got.stack(SITE).lengths.tolist() == want.stack(SITE).lengths.tolist()
    service = server.service
    base = service.call("pool_usage")
    channel = remote._backend.open_run(None, 8, {"max_new_tokens": 60, "stop_tokens": []})
    channel.feed([(i, Item("Once upon a time")) for i in range(8)], last=False)
    next(channel.events())
    channel.s.close()  # gone without a word
    deadline = time.monotonic() + WAIT
    while (service.engine.sessions or service.engine.runs.runs) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not service.engine.sessions and not service.engine.runs.runs
    assert service.call("pool_usage") == base
    remote.close()


def test_ten_thousand_prompts_never_meet_a_session_limit(loaded):
    srv = ServerThread(Engine([loaded]), limits=Limits(max_sessions_per_key=2), startup_timeout=WAIT)
    try:
        remote = djinn.connect(srv.url)
        n = 0
        for out in remote.run_iter(([1 + i % 90] for i in range(10_000)), window=512,
                                   interventions=[djinn.Capture("hook_embed")]):
            n += out.captures[("hook_embed", 0)].shape[0]
        assert n == 10_000
        with remote.session(), remote.session():
            with pytest.raises(djinn.LimitExceeded, match="session_by_id"):
                remote.session()
            assert len(remote.run(["a", "b", "c"])) == 3  # a run's sessions are its own, not the key's
        remote.close()
    finally:
        srv.stop()


def test_sessions_are_found_again_by_id_and_their_lifetimes_are_reported(loaded):
    import httpx

    srv = ServerThread(Engine([loaded], idle_ttl=90.0), api_keys=["key-a", "key-b"], startup_timeout=WAIT)
    metrics = httpx.get(srv.url + "/metrics", timeout=WAIT).text
    assert "djinn_session_idle_ttl_seconds 90.0" in metrics and "djinn_runs_active 0.0" in metrics
    a, b = djinn.connect(srv.url, api_key="key-a"), djinn.connect(srv.url, api_key="key-b")
    s = a.session()
    s.generate("Once upon", max_new_tokens=2)
    assert [i["id"] for i in a.sessions()] == [s.id]
    again = a.session_by_id(s.id)
    assert again.info()["n_tokens"] > 0
    with pytest.raises(djinn.Forbidden):  # another key cannot reach it
        b.session_by_id(s.id)
    assert b.sessions() == []
    again.close()
    assert a.sessions() == []
    a.close()
    b.close()
    srv.stop()


def _loop_patch(client, clean, corrupted, sites, metric):
    """The same sweep by hand: a capture of the clean prompt, then one patched generate call per cell."""
    (ref,) = client.run([clean], interventions=[djinn.Capture(s) for s in sites])
    grid = torch.empty(len(sites), len(corrupted))
    for i, site in enumerate(sites):
        value = ref.captures[(site, 0)]
        for p in range(len(corrupted)):
            row = value[:, p] if site.endswith("hook_pattern") else value[p]
            out = _alone(client, corrupted, max_new_tokens=1, return_logits=True, stop_tokens=[],
                         interventions=[djinn.Replace(site, row, positions=[p], steps=[0])])
            grid[i, p] = metric(out.logits[0])
    return grid


def test_activation_patching_equals_a_loop_of_patched_calls(client):
    clean = client.tokenize("Once upon a time there was a cat")
    corrupted = clean[:-3] + [clean[-3] + 1] + clean[-2:]  # one token changed
    changed = [p for p in range(len(clean)) if clean[p] != corrupted[p]]
    assert len(clean) == len(corrupted) and len(changed) == 1
    metric = patching.logit_diff(5, 9)
    sites = ["blocks.0.hook_resid_pre", "blocks.1.hook_attn_out", "blocks.1.hook_mlp_out", "blocks.0.attn.hook_pattern"]
    grid = patching.activation_patch(client, clean, corrupted, sites=sites, metric=metric)
    assert grid.shape == (len(sites), len(clean))
    assert (grid - _loop_patch(client, clean, corrupted, sites, metric)).abs().max() <= 1e-4
    # the first block's input at the one differing token carries all the difference: patched, it is the
    # clean run; patched anywhere else (the same values), it is the corrupted run
    same = [p for p in range(len(clean)) if p not in changed]
    assert abs(grid[0, changed[0]] - patching.metric_of(client, clean, metric)) <= 1e-4
    assert (grid[0, same] - patching.metric_of(client, corrupted, metric)).abs().max() <= 1e-4
    heads = patching.activation_patch(client, clean, corrupted, sites="blocks.1.attn.hook_z", metric=metric,
                                      per_head=True, positions=changed)
    n_heads = client.models()[0].n_heads
    assert heads.shape == (1, len(changed), n_heads)
    (ref,) = client.run([clean], interventions=[djinn.Capture("blocks.1.attn.hook_z")])
    z = ref.captures[("blocks.1.attn.hook_z", 0)]
    for j, p in enumerate(changed):
        for h in (0, n_heads - 1):
            (corr,) = client.run([corrupted], interventions=[djinn.Capture("blocks.1.attn.hook_z")])
            mixed = corr.captures[("blocks.1.attn.hook_z", 0)][p].clone()
            mixed[h] = z[p, h]
            out = _alone(client, corrupted, max_new_tokens=1, return_logits=True, stop_tokens=[],
                         interventions=[djinn.Replace("blocks.1.attn.hook_z", mixed, positions=[p], steps=[0])])
            assert abs(heads[0, j, h] - metric(out.logits[0])) <= 1e-4
    with pytest.raises(djinn.InvalidRequest, match="head dimension"):
        patching.activation_patch(client, clean, corrupted, sites="blocks.0.hook_resid_pre", metric=metric,
                                  per_head=True)
    with pytest.raises(djinn.InvalidRequest, match="same number|pairs them"):
        patching.activation_patch(client, clean, corrupted[:-1], metric=metric)


def test_a_patching_grid_plots_as_a_heatmap(client):
    matplotlib = pytest.importorskip("matplotlib", reason="the plot helper needs the optional matplotlib")
    matplotlib.use("Agg")
    grid = torch.randn(3, 5)
    ax = patching.plot(grid, sites=["a", "b", "c"], positions=list("vwxyz"), title="patching")
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "c"]
    assert ax.images[0].get_array().shape == (3, 5)


def test_a_progress_bar_where_asked(client, capsys):
    assert len(client.run(PROMPTS, progress=True)) == len(PROMPTS)
    assert f"{len(PROMPTS)}/{len(PROMPTS)}" in capsys.readouterr().err


def test_the_asyncio_client_runs_as_the_sync_one(server):
    import asyncio

    from djinn.client.aio import connect_async

    sync = djinn.connect(server.url)
    want = sync.run(PROMPTS, max_new_tokens=3, interventions=[djinn.Capture(SITE)], stop_tokens=[])

    async def main():
        async with await connect_async(server.url) as client:
            got = await client.run(PROMPTS, max_new_tokens=3, interventions=[djinn.Capture(SITE)], stop_tokens=[],
                                   window=2)
            n = 0
            async for out in client.run_iter(([1 + i % 90] for i in range(300)), window=16):
                n += 1
            with pytest.raises(djinn.TokenOutOfRange, match="prompt 1"):
                await client.run(["a", [10**6]])
            return got, n
    got, n = asyncio.run(main())
    assert n == 300 and [g.token_ids for g in got] == [w.token_ids for w in want]
    assert all((g.captures[(SITE, 0)] - w.captures[(SITE, 0)]).abs().max() <= TOL for g, w in zip(got, want))
    assert not server.service.engine.sessions and not server.service.engine.runs.runs
    sync.close()


def test_a_run_within_its_keys_share_of_the_pool(loaded):
    from djinn.client.api import Client
    from djinn.client.embedded import EmbeddedBackend

    # 16 device + 16 host blocks of 16 tokens, half of them this key's: 16 blocks; a 60-token prompt needs 4
    with Client(EmbeddedBackend(Engine([loaded], kv_blocks=16, host_kv_blocks=16, kv_share_per_key=0.5))) as c:
        with pytest.raises(djinn.LimitExceeded, match="these 8 prompts"):
            c.run([[1] + [7] * 59] * 8, window=8)
        assert not _engine(c).sessions and not _engine(c).runs.runs
        assert len(c.run([[1] + [7] * 59] * 8, window=2)) == 8  # a smaller window fits

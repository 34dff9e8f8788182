"""Breakpoints are real pauses: unmodified resume is bit-identical, edits change the output, and a paused
session holds nobody else up."""
import threading
import time

import pytest
import torch

import djinn

SITES = ["hook_embed", "blocks.1.hook_resid_pre", "blocks.2.attn.hook_z", "blocks.2.hook_attn_out",
         "blocks.3.hook_resid_mid", "blocks.3.hook_mlp_out", "blocks.4.hook_resid_post", "ln_final.hook_out"]
PROMPT = "Once upon a time, there was a dog"


@pytest.fixture(scope="module")
def client(stories_path):
    c = djinn.connect(model=str(stories_path))
    yield c
    c.close()


@pytest.fixture(scope="module")
def reference(client):
    return client.session().generate(PROMPT, max_new_tokens=12, return_logits=True)


def run_with_pauses(session, site, steps, edit=None):
    pauses = []
    for ev in session.stream(PROMPT, max_new_tokens=12, return_logits=True,
                             breakpoints=[djinn.Breakpoint(site, steps=steps)]):
        if isinstance(ev, djinn.Paused):
            pauses.append(ev)
            ev.resume(edit(ev.activation) if edit else None)
        elif isinstance(ev, djinn.Done):
            return ev.result, pauses
    raise AssertionError("no Done event")


@pytest.mark.parametrize("site", SITES)
def test_unmodified_pause_is_bit_identical(client, reference, site):
    out, pauses = run_with_pauses(client.session(), site, [0, 1, 5])
    assert [(p.site, p.step) for p in pauses] == [(site, 0), (site, 1), (site, 5)]
    n_prompt = len(client.tokenize(PROMPT))  # BOS included, as the prompt is fed
    assert pauses[0].positions == list(range(n_prompt))
    assert pauses[1].positions == [n_prompt]
    per_token = (8, 8) if site.endswith("hook_z") else (64,)
    assert tuple(pauses[0].activation.shape) == (n_prompt, *per_token)
    assert tuple(pauses[2].activation.shape) == (1, *per_token)
    assert out.token_ids == reference.token_ids
    assert torch.equal(out.logits, reference.logits)


def test_resume_with_the_same_tensor_is_bit_identical(client, reference):
    out, _ = run_with_pauses(client.session(), "blocks.2.hook_resid_post", "all", edit=lambda a: a.clone())
    assert out.token_ids == reference.token_ids
    assert torch.equal(out.logits, reference.logits)


def test_edited_activation_changes_the_output(client, reference):
    out, _ = run_with_pauses(client.session(), "blocks.1.hook_resid_post", [0], edit=lambda a: a * -3.0)
    assert out.token_ids != reference.token_ids


def test_paused_session_holds_nobody_up(client):
    solo = client.session().generate("The cat", max_new_tokens=40).token_ids
    results, finished_while_paused = {}, []

    def runner(name):
        results[name] = client.session().generate("The cat", max_new_tokens=40).token_ids

    a = client.session()
    stream = a.stream(PROMPT, max_new_tokens=8, breakpoints=[djinn.Breakpoint("blocks.2.hook_resid_mid", steps=[2])])
    for ev in stream:
        if isinstance(ev, djinn.Paused):
            threads = [threading.Thread(target=runner, args=(n,)) for n in "BC"]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
            finished_while_paused.append(a.info()["state"] == "paused" and len(results) == 2)
            time.sleep(0.5)  # stays paused a while longer; nothing is waiting on it
            ev.resume()
        elif isinstance(ev, djinn.Done):
            assert len(ev.result.token_ids) == 8
    assert finished_while_paused == [True]
    assert results["B"] == solo and results["C"] == solo


def test_many_sessions_paused_at_once_at_different_sites(client):
    prompts = ["The dog", "A girl", "Tim saw", "One day", "The sun", "Lily had"]
    solo = [client.session().generate(p, max_new_tokens=10).token_ids for p in prompts]
    sites = ["hook_embed", "blocks.0.attn.hook_z", "blocks.1.hook_mlp_out", "blocks.2.hook_resid_mid",
             "blocks.4.hook_resid_post", "ln_final.hook_out"]
    barrier = threading.Barrier(len(prompts), timeout=60)
    results = [None] * len(prompts)
    states = []

    def worker(i):
        s = client.session()
        for ev in s.stream(prompts[i], max_new_tokens=10, breakpoints=[djinn.Breakpoint(sites[i], steps=[3])]):
            if isinstance(ev, djinn.Paused):
                barrier.wait()  # every session is paused now
                if i == 0:
                    states.append(client.sessions())
                barrier.wait()
                ev.resume()
            elif isinstance(ev, djinn.Done):
                results[i] = ev.result.token_ids

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sum(1 for info in states[0] if info["state"] == "paused") == len(prompts)
    assert results == solo


def test_breakpoint_at_several_sites_and_steps_of_one_call(client, reference):
    seen = []
    bps = [djinn.Breakpoint("blocks.*.hook_resid_post", steps=[0]), djinn.Breakpoint("hook_embed", steps=range(2, 4))]
    for ev in client.session().stream(PROMPT, max_new_tokens=12, return_logits=True, breakpoints=bps):
        if isinstance(ev, djinn.Paused):
            seen.append((ev.site, ev.step))
            ev.resume()
        elif isinstance(ev, djinn.Done):
            out = ev.result
    assert seen == [(f"blocks.{i}.hook_resid_post", 0) for i in range(5)] + [("hook_embed", 2), ("hook_embed", 3)]
    assert torch.equal(out.logits, reference.logits)


def test_pause_time_to_live_frees_the_session(stories_path):
    c = djinn.connect(model=str(stories_path), pause_ttl=0.3)
    engine = c._backend.service.engine
    before = engine.pool_usage()
    s = c.session()
    stream = s.stream(PROMPT, max_new_tokens=8, breakpoints=[djinn.Breakpoint("blocks.1.hook_resid_post")])
    assert isinstance(next(stream), djinn.Paused)
    time.sleep(0.8)
    with pytest.raises(djinn.SessionExpired):
        next(stream)
    with pytest.raises(djinn.UnknownSession):
        s.info()
    assert engine.pool_usage() == before
    c.close()

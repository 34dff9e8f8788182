"""Bad input gets a typed djinn error with a clear message, and loses nothing: the session and every other
session carry on."""
import pytest
import torch

import djinn
from djinn.engine.engine import Engine
from djinn.models.loading import load_model


@pytest.fixture(scope="module")
def client(stories_path):
    c = djinn.connect(model=str(stories_path))
    yield c
    c.close()


@pytest.fixture()
def sessions(client):
    a, b = client.session(), client.session()
    a.generate("Once upon a time", max_new_tokens=5)
    b.generate("The dog", max_new_tokens=5)
    expected = {}
    for s in (a, b):  # what each session would do next, had nothing happened
        expected[s.id] = s.fork().generate(" and", max_new_tokens=8).token_ids
    return a, b, expected


def still_fine(a, b, expected):
    for s in (a, b):
        assert s.info()["state"] == "idle"
        assert s.generate(" and", max_new_tokens=8).token_ids == expected[s.id]


CASES = [
    ("unknown site", lambda s: s.generate("x", interventions=[djinn.Capture("blocks.99.hook_resid_post")]),
     djinn.UnknownSite, "unknown hook site"),
    ("misspelt site", lambda s: s.generate("x", interventions=[djinn.Scale("blocks.1.resid_post", 0.0)]),
     djinn.UnknownSite, "resid_post"),
    ("wildcard matching nothing", lambda s: s.generate("x", interventions=[djinn.Capture("foo.*")]),
     djinn.UnknownSite, "matches no"),
    ("steer vector wrong shape", lambda s: s.generate("x", interventions=[
        djinn.Steer("blocks.1.hook_resid_post", torch.ones(63))]), djinn.InvalidTensor, "shape"),
    ("steer vector NaN", lambda s: s.generate("x", interventions=[
        djinn.Steer("blocks.1.hook_resid_post", torch.full((64,), float("nan")))]), djinn.InvalidTensor, "NaN"),
    ("replacement Inf", lambda s: s.generate("x", interventions=[
        djinn.Replace("blocks.1.hook_resid_post", torch.full((64,), float("inf")))]), djinn.InvalidTensor, "Inf"),
    ("integer tensor", lambda s: s.generate("x", interventions=[
        djinn.Steer("blocks.1.hook_resid_post", torch.ones(64, dtype=torch.long))]), djinn.InvalidTensor, "floating"),
    ("rows without positions", lambda s: s.generate("x", interventions=[
        djinn.Replace("blocks.1.hook_resid_post", torch.ones(3, 64))]), djinn.InvalidTensor, "shape"),
    ("not an intervention", lambda s: s.generate("x", interventions=["scale it"]), djinn.InvalidRequest, "intervention"),
    ("token id out of range", lambda s: s.generate([1, 512]), djinn.TokenOutOfRange, "512"),
    ("negative token id", lambda s: s.generate([1, -1]), djinn.TokenOutOfRange, "-1"),
    ("non-integer token", lambda s: s.generate([1, 2.5]), djinn.InvalidRequest, "integers"),
    ("prompt beyond context", lambda s: s.generate([1] * 600), djinn.ContextOverflow, "context"),
    ("negative max tokens", lambda s: s.generate("x", max_new_tokens=-1), djinn.InvalidRequest, "max_new_tokens"),
    ("bad temperature", lambda s: s.generate("x", temperature=float("nan")), djinn.InvalidRequest, "temperature"),
    ("bad top_p", lambda s: s.generate("x", top_p=0.0), djinn.InvalidRequest, "top_p"),
    ("bad steps", lambda s: s.generate("x", interventions=[djinn.Capture("hook_embed", steps=[-1])]),
     djinn.InvalidRequest, "steps"),
    ("resume when not paused", lambda s: s._backend.call("resume", s.id, None), djinn.NotPaused, "not paused"),
]


@pytest.mark.parametrize("name,call,error,text", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_typed_and_harmless(sessions, name, call, error, text):
    a, b, expected = sessions
    with pytest.raises(error, match=text) as info:
        call(a)
    assert isinstance(info.value, djinn.DjinnError) and info.value.code == error.code
    still_fine(a, b, expected)


def test_bad_replacement_at_a_breakpoint_keeps_the_session_paused(client, sessions):
    a, b, expected = sessions
    s = client.session()
    ref = client.session().generate("The cat", max_new_tokens=6).token_ids
    stream = s.stream("The cat", max_new_tokens=6, breakpoints=[djinn.Breakpoint("blocks.2.hook_resid_post")])
    ev = next(stream)
    assert isinstance(ev, djinn.Paused)
    for bad, match in [(torch.ones(1, 64), "shape"), (torch.full(ev.activation.shape, float("nan")), "NaN"),
                       (torch.ones(ev.activation.shape, dtype=torch.int32), "floating"), ("zeros", "torch.Tensor")]:
        with pytest.raises(djinn.InvalidTensor, match=match):
            ev.resume(bad)
        assert s.info()["state"] == "paused"
    with pytest.raises(djinn.SessionBusy):
        s.generate("more")
    ev.resume()
    assert [e.token_id for e in stream if isinstance(e, djinn.Token)] == ref
    still_fine(a, b, expected)


def test_unknown_model_and_session(client, sessions):
    a, b, expected = sessions
    with pytest.raises(djinn.UnknownModel, match="no-such-model"):
        client.session("no-such-model")
    ghost = djinn.Session(a._backend, "no-such-session")
    with pytest.raises(djinn.UnknownSession):
        ghost.generate("x")
    with pytest.raises(djinn.UnknownSession):
        ghost.close()
    with pytest.raises(djinn.UnknownModel):
        djinn.connect(model="/no/such/path")
    still_fine(a, b, expected)


def test_a_file_that_is_not_a_llama2c_checkpoint(tmp_path):
    junk = tmp_path / "weights.bin"
    junk.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(djinn.UnknownModel, match="not a llama2.c checkpoint"):
        djinn.connect(model=str(junk))


def test_another_users_session_is_out_of_reach(stories_path):
    engine = Engine([load_model(str(stories_path))])
    sid = engine.create_session("alice")
    engine.generate(sid, "alice", "Once", lambda ev: None, max_new_tokens=3)
    while engine.has_work():
        engine.step()
    for call in [lambda: engine.session_info(sid, "mallory"), lambda: engine.close_session(sid, "mallory"),
                 lambda: engine.fork(sid, "mallory"), lambda: engine.checkpoint(sid, "mallory"),
                 lambda: engine.resume(sid, "mallory"), lambda: engine.set_interventions(sid, "mallory", []),
                 lambda: engine.generate(sid, "mallory", "x", lambda ev: None),
                 lambda: engine.attach(sid, "mallory", lambda ev: None)]:
        with pytest.raises(djinn.Forbidden):
            call()
    assert engine.list_sessions("mallory") == []
    with pytest.raises(djinn.InvalidRequest, match="no call in progress"):
        engine.attach(sid, "alice", lambda ev: None)
    assert engine.session_info(sid, "alice").n_tokens == 1 + 1 + 3  # BOS, "Once", three new tokens


def test_a_late_resume_never_continues_a_later_pause(client):
    ref = client.session().generate([1, 403, 9, 30, 55], max_new_tokens=6).token_ids
    s = client.session()
    first = None
    for ev in s.stream([1, 403, 9, 30, 55], max_new_tokens=6,
                       breakpoints=[djinn.Breakpoint("blocks.2.hook_mlp_out", steps=[1, 2])]):
        if isinstance(ev, djinn.Paused) and ev.step == 1:
            first = ev
            ev.resume()
        elif isinstance(ev, djinn.Paused):  # step 2: the step-1 event must not resume it
            with pytest.raises(djinn.NotPaused, match="already resumed"):
                first.resume(torch.full_like(first.activation, 100.0))
            assert s.info()["state"] == "paused"
            ev.resume()
        elif isinstance(ev, djinn.Done):
            assert ev.result.token_ids == ref


def test_interventions_snapshot_the_callers_tensors(client):
    vec = torch.zeros(64)
    s = client.session()
    s.set_interventions([djinn.Replace("blocks.2.hook_resid_post", vec)])
    before = s.fork().generate("Once", max_new_tokens=6).token_ids
    vec.fill_(7.0)  # changing the caller's tensor afterwards changes nothing
    assert s.generate("Once", max_new_tokens=6).token_ids == before


def test_attaching_twice_announces_a_pause_once(stories_path):
    engine = Engine([load_model(str(stories_path))])
    sid = engine.create_session("u")
    engine.generate(sid, "u", [1, 403, 9], lambda ev: None, max_new_tokens=4,
                    breakpoints=[djinn.Breakpoint("blocks.1.hook_resid_post", steps=[0, 1])])
    for _ in range(3):
        engine.step()
    first, second = [], []
    engine.attach(sid, "u", first.append)
    engine.attach(sid, "u", second.append)
    for _ in range(3):
        engine.step()
    assert [type(e).__name__ for e in first] == ["Error"]  # told that another stream took over
    paused = [e for e in second if isinstance(e, djinn.Paused)]
    assert len(paused) == 1 and paused[0].step == 0
    engine.resume(sid, "u", None, paused[0].pause_id)

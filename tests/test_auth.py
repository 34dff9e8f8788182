"""API keys: every session belongs to the key that made it. Another key can neither see nor touch it (list,
read, stream, resume, fork, checkpoint, close, ...: typed errors); missing or wrong keys are refused; the
owner's session is intact afterwards."""
from __future__ import annotations

import httpx
import openai
import pytest
import torch
import websockets.sync.client

import djinn
from djinn.server.auth import Auth, identity, load_api_keys
from djinn.wire import PROTOCOL_VERSION, pack, unpack
from serverutil import WAIT, running_server

ALICE, BOB = "alice-secret-key", "bob-other-key"
SITE = "blocks.2.hook_resid_post"


@pytest.fixture(scope="module")
def server(stories_path):
    with running_server(stories_path, api_keys=[ALICE, BOB]) as srv:
        yield srv


def test_second_key_cannot_touch_first_keys_sessions(server):
    alice = djinn.connect(server.url, api_key=ALICE)
    bob = djinn.connect(server.url, api_key=BOB)
    mine = alice.session()
    first = mine.generate("Once upon a time", max_new_tokens=6)
    reference = mine.fork()  # what `mine` does next, had nothing happened
    expected_next = reference.generate(" and", max_new_tokens=8).token_ids
    ck = mine.checkpoint()
    ck.wait()
    before = mine.info()

    # bob does not see alice's sessions
    assert mine.id not in {s["id"] for s in bob.sessions()}
    assert {mine.id, reference.id} <= {s["id"] for s in alice.sessions()}

    theirs = djinn.Session(bob._backend, mine.id)  # bob holding alice's session id
    their_ck = djinn.Checkpoint(bob._backend, ck.id)
    attempts = {
        "read": lambda: theirs.info(),
        "generate": lambda: theirs.generate(" stolen", max_new_tokens=2),
        "stream": lambda: list(theirs.stream(" stolen", max_new_tokens=2,
                                             breakpoints=[djinn.Breakpoint(SITE)])),
        "resume": lambda: bob._backend.call("resume", mine.id, None),
        "cancel": lambda: bob._backend.call("cancel", mine.id),
        "fork": lambda: theirs.fork(),
        "checkpoint": lambda: theirs.checkpoint(),
        "set_interventions": lambda: theirs.set_interventions([djinn.Scale(SITE, 0.0)]),
        "close": lambda: theirs.close(),
        "checkpoint status": lambda: their_ck.status(),
        "restore": lambda: their_ck.restore(),
        "delete checkpoint": lambda: their_ck.delete(),
    }
    for name, attempt in attempts.items():
        with pytest.raises(djinn.Forbidden) as info:
            attempt()
        assert info.value.code == "forbidden", name

    # also while alice's session is paused at a breakpoint: bob can neither resume it nor cancel it
    s2 = alice.session()
    stream = s2.stream("Once upon a time", max_new_tokens=5, breakpoints=[djinn.Breakpoint(SITE, steps=[1])])
    toks = []
    for ev in stream:
        if isinstance(ev, djinn.Paused):
            for attempt in (lambda: bob._backend.call("resume", s2.id, torch.zeros(1, 64)),
                            lambda: bob._backend.call("cancel", s2.id),
                            lambda: djinn.Session(bob._backend, s2.id).close()):
                with pytest.raises(djinn.Forbidden):
                    attempt()
            assert s2.info()["state"] == "paused"
            ev.resume()
        elif isinstance(ev, djinn.Token):
            toks.append(ev.token_id)
    assert toks == first.token_ids[:5]

    # alice's session and checkpoint are intact
    assert mine.info() == before
    assert mine.generate(" and", max_new_tokens=8).token_ids == expected_next
    assert ck.status()["done"]
    restored = ck.restore()
    assert restored.info()["n_tokens"] == before["n_tokens"]
    for c in (alice, bob):
        c.close()


def test_missing_or_wrong_keys_are_refused(server):
    base = server.url
    r = httpx.get(base + "/api/models", timeout=WAIT)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    r = httpx.get(base + "/api/sessions", headers={"Authorization": "Bearer nope"}, timeout=WAIT)
    assert r.status_code in (401, 403) and r.json()["error"]["code"] == "unauthorized"
    assert "traceback" not in r.text.lower()
    r = httpx.post(base + "/api/sessions", headers={"X-API-Key": "also-wrong"}, json={}, timeout=WAIT)
    assert r.status_code in (401, 403)
    assert httpx.get(base + "/healthz", timeout=WAIT).status_code == 200  # health stays open for load balancers

    for key in (None, "wrong"):
        c = djinn.connect(base, api_key=key)
        with pytest.raises(djinn.Unauthorized):
            c.models()
        with pytest.raises(djinn.Unauthorized):
            c.session()
        with pytest.raises(djinn.Unauthorized):  # over the WebSocket too
            list(djinn.Session(c._backend, "whatever").stream("x"))
        c.close()

    # a raw WebSocket without a key gets a typed error frame, not a dropped connection
    with websockets.sync.client.connect(base.replace("http", "ws") + "/api/sessions/x/stream", proxy=None, open_timeout=WAIT) as ws:
        ws.send(pack({"type": "hello", "protocol": PROTOCOL_VERSION}))
        msg = unpack(ws.recv())
        assert msg["type"] == "error" and msg["code"] == "unauthorized"

    # the OpenAI routes use the same keys
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).completions.create(
            model="stories260K", prompt="Once", max_tokens=2)
    ok = openai.OpenAI(base_url=base + "/v1", api_key=ALICE, max_retries=0).completions.create(
        model="stories260K", prompt="Once", max_tokens=2, temperature=0)
    assert ok.choices[0].text


def test_key_sources_and_identity(tmp_path):
    f = tmp_path / "keys"
    f.write_text("# operators\nkey-one\n\n  key-two  # trailing comment\n")
    assert load_api_keys(f, env={"DJINN_API_KEYS": "key-three, key-four"}) == \
        ["key-one", "key-two", "key-three", "key-four"]
    auth = Auth(["key-one"])
    who = auth.identify({"authorization": "Bearer key-one"})
    assert who == identity("key-one") and "key-one" not in who  # the key itself is never the owner name
    with pytest.raises(djinn.Unauthorized):
        auth.identify({})
    assert Auth([]).identify({}) == "local"  # no keys: the single local user

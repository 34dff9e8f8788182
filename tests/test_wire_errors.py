"""Bad input over the wire: random bytes, truncated and oversize frames, a wrong protocol version, tensors of
the wrong shape or dtype, NaN, unknown sites / models / sessions / routes, per-key limits, and a seeded
fuzz. Each gets its typed error with a stable code; the server and every other session carry on."""
from __future__ import annotations

import json
import math
import os
import random
import threading

import httpx
import msgpack
import pytest
import torch
import websockets.sync.client

import djinn
import test_bad_input as engine_cases  # the engine's bad-input cases, run again through the server
from djinn.errors import ERRORS_BY_CODE
from djinn.server.limits import Limits
from djinn.wire import PROTOCOL_VERSION, TENSOR_EXT, encode_intervention, pack, unpack
from serverutil import WAIT, running_server

SITE = "blocks.2.hook_resid_post"
STORY = "Once upon a time"
FRAME_LIMIT = 256 << 10
LIMITS = Limits(max_frame_bytes=FRAME_LIMIT, max_prompt_tokens=2048, max_new_tokens=256, max_sessions_per_key=4096)


@pytest.fixture(scope="module")
def server(stories_path):
    with running_server(stories_path, limits=LIMITS) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    c = djinn.connect(server.url)
    yield c
    c.close()


@pytest.fixture()
def sessions(client):
    """Two remote sessions with history, and what each does next had nothing happened (as in
    test_bad_input)."""
    a, b = client.session(), client.session()
    a.generate("Once upon a time", max_new_tokens=5)
    b.generate("The dog", max_new_tokens=5)
    expected = {s.id: s.fork().generate(" and", max_new_tokens=8).token_ids for s in (a, b)}
    return a, b, expected


def ws_url(server, sid: str) -> str:
    return server.url.replace("http://", "ws://") + f"/api/sessions/{sid}/stream"


def open_ws(server, sid: str = "x"):
    return websockets.sync.client.connect(ws_url(server, sid), proxy=None, max_size=None, legacy=True, open_timeout=WAIT)


def first_reply(server, *frames, sid: str = "x") -> dict:
    """Send raw frames on a fresh stream; the server's first answer that is not its hello."""
    with open_ws(server, sid) as ws:
        for f in frames:
            try:
                ws.send(f)
            except websockets.exceptions.ConnectionClosed:  # it already answered and closed: read why
                break
        while True:
            msg = unpack(ws.recv(timeout=WAIT))
            if msg.get("type") != "hello":
                return msg


def hello(version=PROTOCOL_VERSION) -> bytes:
    return pack({"type": "hello", "protocol": version})


def generate(prompt=STORY, **params) -> bytes:
    return pack({"type": "generate", "prompt": prompt, "params": params})


def assert_typed(msg: dict, code: str) -> None:
    assert msg["type"] in ("error", "reply"), msg
    assert msg["code"] == code, msg
    assert msg["code"] in ERRORS_BY_CODE and msg["message"] and "Traceback" not in msg["message"]


# ---------------------------------------------------------------- the engine's cases, over the wire

@pytest.mark.parametrize("name,call,error,text", engine_cases.CASES, ids=[c[0] for c in engine_cases.CASES])
def test_engine_bad_input_cases_over_the_wire(sessions, name, call, error, text):
    a, b, expected = sessions
    with pytest.raises(error, match=text) as info:
        call(a)
    assert type(info.value) is error and info.value.code == error.code
    engine_cases.still_fine(a, b, expected)


def test_bad_replacements_at_a_breakpoint_over_the_wire(client, sessions):
    engine_cases.test_bad_replacement_at_a_breakpoint_keeps_the_session_paused(client, sessions)


def test_unknown_model_and_session_over_the_wire(client, sessions):
    engine_cases.test_unknown_model_and_session(client, sessions)


# ---------------------------------------------------------------- raw frames

def test_first_frame_errors(server):
    assert_typed(first_reply(server, bytes(random.Random(0).randbytes(64))), "malformed_frame")
    assert_typed(first_reply(server, "a text frame"), "malformed_frame")
    assert_typed(first_reply(server, hello()[:-2]), "malformed_frame")  # truncated
    assert_typed(first_reply(server, pack([1, 2, 3])), "malformed_frame")  # not a map
    assert_typed(first_reply(server, generate()), "malformed_frame")  # generate before hello
    msg = first_reply(server, hello(99))
    assert_typed(msg, "protocol_mismatch")
    assert "99" in msg["message"] and str(PROTOCOL_VERSION) in msg["message"]
    assert_typed(first_reply(server, b"\x92" + b"\x00" * (FRAME_LIMIT + 10)), "frame_too_large")
    assert_typed(first_reply(server, pack({"type": "hello", "protocol": PROTOCOL_VERSION,
                                           "x": msgpack.ExtType(42, b"zz")})), "malformed_frame")


def test_control_socket_frames(server, client, sessions):
    """Bad frames and calls on the control socket get typed replies (their id echoed) and the socket goes on;
    a bad first frame ends it with a typed error, as on a stream."""
    a, b, expected = sessions
    url = server.url.replace("http://", "ws://") + "/api/control"
    with websockets.sync.client.connect(url, proxy=None, max_size=None, legacy=True, open_timeout=WAIT) as ws:
        ws.send(hello())
        assert unpack(ws.recv())["type"] == "hello"

        def call(frame):
            ws.send(frame if isinstance(frame, (bytes, str)) else pack(frame))
            return unpack(ws.recv())
        cases = [(bytes(random.Random(1).randbytes(40)), "malformed_frame", None),
                 ("a text frame", "malformed_frame", None),
                 (b"\x92" + b"\x00" * (FRAME_LIMIT + 10), "frame_too_large", None),
                 ({"type": "resume", "id": 1}, "malformed_frame", 1),
                 ({"type": "call", "id": 2, "method": "format_disk", "args": []}, "invalid_request", 2),
                 ({"type": "call", "id": 3, "method": "checkpoint", "args": "abc"}, "malformed_frame", 3),
                 ({"type": "call", "id": 4, "method": "checkpoint", "args": [a.id, 1, 2]}, "invalid_request", 4),
                 ({"type": "call", "id": 5, "method": "session_info", "args": ["nope"]}, "unknown_session", 5),
                 ({"type": "call", "id": 6, "method": "tokenize", "args": [7]}, "invalid_request", 6),
                 ({"type": "call", "id": 7, "method": "detokenize", "args": [[1, 10 ** 6]]}, "token_out_of_range", 7),
                 ({"type": "call", "id": 8, "method": "set_interventions", "args": [a.id, [{"type": "nope"}]]},
                  "invalid_request", 8),
                 ({"type": "call", "id": 9, "method": "models", "args": [], "extra": 1}, "invalid_request", 9)]
        for frame, code, call_id in cases:
            msg = call(frame)
            assert_typed(msg, code)
            assert msg["ok"] is False and msg["id"] == call_id
        ok = call({"type": "call", "id": 10, "method": "session_info", "args": [a.id]})
        assert ok["ok"] and ok["id"] == 10 and ok["result"]["id"] == a.id
    with websockets.sync.client.connect(url, proxy=None, legacy=True, open_timeout=WAIT) as ws:
        ws.send(hello(99))
        msg = unpack(ws.recv())
        assert_typed(msg, "protocol_mismatch")
    for s in (a, b):  # nothing of it touched the sessions
        assert s.fork().generate(" and", max_new_tokens=8).token_ids == expected[s.id]


def test_every_declared_call_is_an_engine_method_taking_the_key_where_declared():
    import inspect

    from djinn.calls import CALLS, Owner
    from djinn.engine.engine import Engine

    for call in CALLS.values():
        params = list(inspect.signature(getattr(Engine, call.name)).parameters)[1:]  # after self
        extra = 1 if call.creates == "checkpoint" else 0  # the server's limit check
        inspect.signature(getattr(Engine, call.name)).bind(
            None, *call.engine_args("key", [None] * len(call.args)), *[None] * extra)
        where = {Owner.NONE: None, Owner.CALLER: 0, Owner.OF_ID: 1}[call.owner]
        assert ("owner" in params) == (where is not None), call.name
        if where is not None:
            assert params.index("owner") == where, call.name


def test_the_clients_import_nothing_of_the_server():
    import subprocess
    import sys

    code = ("import sys, djinn, djinn.client.remote, djinn.client.aio; "
            "print(sorted(m for m in sys.modules if m.startswith('djinn.server')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_app_serves_each_declared_call_at_its_route(server):
    from djinn.calls import CALLS

    served = {(r.path, m) for r in server.app.routes for m in getattr(r, "methods", ()) or ()}
    for call in CALLS.values():
        assert (call.path, call.verb) in served, call.name


def test_rest_routes_give_what_the_control_socket_gives(server, client):
    """The REST routes (for clients that are not this one) and the control socket share their calls."""
    h = {"Accept": "application/json"}
    with httpx.Client(base_url=server.url, headers=h, timeout=30) as http:
        assert http.get("/api/models").json() == [dataclasses_dict(m) for m in client.models()]
        sid = http.post("/api/sessions", json={}).json()["id"]
        r = http.post(f"/api/sessions/{sid}/generate", json={"prompt": STORY, "max_new_tokens": 6})
        tokens = r.json()["token_ids"]
        mine = client.session()
        assert mine.generate(STORY, max_new_tokens=6).token_ids == tokens
        assert http.get(f"/api/sessions/{sid}").json()["n_tokens"] == mine.info()["n_tokens"]
        assert sid in [x["id"] for x in http.get("/api/sessions").json()]
        ids = http.post("/api/tokenize", json={"text": STORY}).json()["ids"]
        assert ids == client.tokenize(STORY)
        assert http.post("/api/detokenize", json={"ids": ids}).json()["text"] == client.detokenize(ids)
        assert http.put(f"/api/sessions/{sid}/interventions", json={"interventions": [
            {"type": "scale", "site": SITE, "factor": 1.0}]}).json() == {"ok": True}
        cid = http.post(f"/api/sessions/{sid}/checkpoint").json()["id"]
        for _ in range(100):
            status = http.get(f"/api/checkpoints/{cid}").json()
            if status["done"]:
                break
        assert status["done"] and status["n_tokens"] == mine.info()["n_tokens"]
        restored = http.post(f"/api/checkpoints/{cid}/restore").json()["id"]
        forked = http.post(f"/api/sessions/{sid}/fork").json()["id"]
        more = [http.post(f"/api/sessions/{x}/generate", json={"prompt": [], "max_new_tokens": 4}).json()["token_ids"]
                for x in (restored, forked)]
        assert more[0] == more[1] == mine.generate([], max_new_tokens=4).token_ids
        assert http.post(f"/api/sessions/{sid}/cancel").json() == {"ok": True}
        assert http.delete(f"/api/checkpoints/{cid}").json() == {"ok": True}
        for x in (sid, restored, forked):
            assert http.delete(f"/api/sessions/{x}").json() == {"ok": True}
        assert http.get(f"/api/sessions/{sid}").json()["error"]["code"] == "unknown_session"


def dataclasses_dict(m) -> dict:
    import dataclasses

    return json.loads(json.dumps(dataclasses.asdict(m)))


def test_generate_frame_errors(server, client):
    sid = client.session().id
    bad_tensor = msgpack.ExtType(TENSOR_EXT, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    steer = {"type": "steer", "site": SITE, "vector": bad_tensor}
    cases = [
        (generate(temperature="hot"), "invalid_request"),
        (generate(frobnicate=True), "invalid_request"),
        (generate(interventions=[steer]), "invalid_tensor"),
        (generate(interventions=[{"type": "steer", "site": SITE, "vector": torch.ones(64), "code": "x"}]),
         "invalid_request"),
        (generate(interventions=[{"type": "exec", "site": SITE}]), "invalid_request"),
        (generate(interventions=[{"type": "steer", "site": SITE, "vector": torch.ones(64, 2)}]), "invalid_tensor"),
        (generate(interventions=[{"type": "steer", "site": SITE,
                                  "vector": torch.full((64,), math.nan, dtype=torch.bfloat16)}]), "invalid_tensor"),
        (generate(interventions=[encode_intervention(djinn.Capture("blocks.77.hook_resid_post"))]), "unknown_site"),
        (generate(prompt={"not": "a prompt"}), "invalid_request"),
        (generate(prompt=[1, 2 ** 40]), "token_out_of_range"),
        (generate(max_new_tokens=10 ** 6), "limit_exceeded"),
        (generate(prompt=[1] * 5000), "limit_exceeded"),
        (pack({"type": "generate", "prompt": STORY, "extra": 1}), "invalid_request"),
    ]
    for frame, code in cases:
        assert_typed(first_reply(server, hello(), frame, sid=sid), code)
    assert_typed(first_reply(server, hello(), generate(), sid="no-such-session"), "unknown_session")
    assert client.session().generate(STORY, max_new_tokens=4).token_ids  # all fine


def paused_stream(server, sid: str, steps=(1,)):
    ws = open_ws(server, sid)
    ws.send(hello())
    ws.send(generate(max_new_tokens=8, breakpoints=[encode_intervention(djinn.Breakpoint(SITE, steps=steps))]))
    assert unpack(ws.recv(timeout=WAIT))["type"] == "hello"
    while True:
        msg = unpack(ws.recv(timeout=WAIT))
        if msg["type"] == "paused":
            return ws, msg
        assert msg["type"] == "token"


def reply_to(ws) -> dict:
    while True:
        msg = unpack(ws.recv(timeout=WAIT))
        if msg["type"] == "reply":
            return msg


def test_frames_during_a_stream(server, client):
    expected = client.session().generate(STORY, max_new_tokens=8).token_ids
    s = client.session()
    ws, paused = paused_stream(server, s.id)
    act = paused["activation"]
    assert act.shape == (1, 64) and act.dtype == torch.float32
    bad = [
        (b"\xc1\xc1\xc1", "malformed_frame"),
        (pack({"type": "resume", "activation": torch.zeros(2, 64)}), "invalid_tensor"),  # wrong shape
        (pack({"type": "resume", "activation": torch.zeros(1, 64, dtype=torch.int32)}), "invalid_tensor"),  # dtype
        (pack({"type": "resume", "activation": torch.full((1, 64), math.nan)}), "invalid_tensor"),
        (pack({"type": "resume", "activation": torch.full((1, 64), math.inf, dtype=torch.float16)}),
         "invalid_tensor"),
        (pack({"type": "resume", "activation": "zeros"}), "invalid_tensor"),
        (pack({"type": "resume", "activation": msgpack.ExtType(TENSOR_EXT, b"garbage")}), "invalid_tensor"),
        (pack({"type": "resume", "activation": None, "sneaky": 1}), "invalid_request"),
        (pack({"type": "teleport"}), "malformed_frame"),
        (generate(), "invalid_request"),
        (b"\x00" * (FRAME_LIMIT + 1), "frame_too_large"),
    ]
    for frame, code in bad:
        ws.send(frame)
        r = reply_to(ws)
        assert r["ok"] is False
        assert_typed(r, code)
        assert s.info()["state"] == "paused"
    ws.send(pack({"type": "resume", "activation": act}))
    assert reply_to(ws)["ok"] is True
    toks = []
    while (msg := unpack(ws.recv(timeout=WAIT)))["type"] != "done":
        assert msg["type"] == "token"
        toks.append(msg["token_id"])
    assert toks == expected[1:] and msg["result"]["token_ids"] == expected
    ws.close()


def test_frame_far_beyond_the_limit(server, client):
    s = client.session()
    ws, _ = paused_stream(server, s.id)
    ws.send(b"\x00" * (FRAME_LIMIT * 2 + (2 << 20)))  # past uvicorn's own ceiling: that connection is closed
    with pytest.raises(websockets.exceptions.ConnectionClosed) as info:
        while True:
            ws.recv(timeout=WAIT)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009
    assert s.info()["state"] == "paused"  # the session waits for its TTL (or a REST resume)
    client._backend.call("resume", s.id, None)
    # the client refuses to send a frame it knows is too large
    s2 = client.session()
    stream = s2.stream(STORY, max_new_tokens=3, breakpoints=[djinn.Breakpoint(SITE, steps=[0])])
    ev = next(stream)
    with pytest.raises(djinn.FrameTooLarge):
        ev.resume(torch.zeros(FRAME_LIMIT, 64))
    ev.resume()
    assert len([e for e in stream if isinstance(e, djinn.Token)]) == 3


def test_rest_errors(server, client):
    u = server.url
    r = httpx.post(u + "/api/sessions", content=b"\x93\x01", headers={"Content-Type": "application/msgpack"}, timeout=WAIT)
    assert r.status_code == 400 and r.json()["error"]["code"] == "malformed_frame"
    r = httpx.post(u + "/api/sessions", content=b"{oops", headers={"Content-Type": "application/json"}, timeout=WAIT)
    assert r.status_code == 400 and r.json()["error"]["code"] == "malformed_frame"
    r = httpx.post(u + "/api/sessions", content=b"x" * (FRAME_LIMIT + 1), timeout=WAIT)
    assert r.status_code == 413 and r.json()["error"]["code"] == "frame_too_large"
    r = httpx.get(u + "/api/models", headers={"X-Djinn-Protocol": "99"}, timeout=WAIT)
    assert r.status_code == 400 and r.json()["error"]["code"] == "protocol_mismatch" and "99" in r.text
    r = httpx.get(u + "/api/nothing-here", timeout=WAIT)
    assert r.status_code == 404 and r.json()["error"]["code"] == "invalid_request"
    r = httpx.patch(u + "/api/models", timeout=WAIT)
    assert r.status_code == 405 and "PATCH" in r.json()["error"]["message"]
    r = httpx.get(u + "/api/checkpoints/nope", timeout=WAIT)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_checkpoint"
    r = httpx.post(u + "/api/sessions", json={"model": "nope"}, timeout=WAIT)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_model"
    r = httpx.post(u + "/api/sessions", json={"model": "stories260K", "colour": "red"}, timeout=WAIT)
    assert r.status_code == 400 and "colour" in r.json()["error"]["message"]
    r = httpx.post(u + "/api/detokenize", json={"ids": [1, 10 ** 6]}, timeout=WAIT)
    assert r.status_code == 400 and r.json()["error"]["code"] == "token_out_of_range"
    sid = client.session().id
    r = httpx.post(u + f"/api/sessions/{sid}/generate", json={"prompt": "x", "breakpoints": [
        {"type": "breakpoint", "site": SITE}]}, timeout=WAIT)
    assert r.status_code == 400 and "stream" in r.json()["error"]["message"]
    r = httpx.post(u + f"/api/sessions/{sid}/generate", json={"prompt": "Once", "max_new_tokens": 3,
                                                               "return_logits": True}, timeout=WAIT)
    assert r.status_code == 200 and len(r.json()["token_ids"]) == 3
    assert r.json()["logits"]["shape"] == [3, 512]
    r = httpx.put(u + f"/api/sessions/{sid}/interventions", json={"interventions": [
        {"type": "steer", "site": SITE, "vector": [0.5] * 64, "scale": 2.0}]}, timeout=WAIT)
    assert r.status_code == 200 and client._backend.call("session_info", sid)["interventions"] == 1
    r = httpx.get(u + "/metrics", timeout=WAIT)
    assert r.status_code == 200 and 'djinn_errors_total{code="malformed_frame"}' in r.text
    assert "djinn_generated_tokens_total" in r.text and "djinn_kv_blocks_used" in r.text
    assert "djinn_graphs_recorded_total 0.0" in r.text  # a CPU engine replays no graphs


def test_per_key_limits(stories_path):
    lim = Limits(max_sessions_per_key=3, max_paused_per_key=1, max_new_tokens=16, max_prompt_tokens=8,
                 max_prompt_chars=40, max_checkpoints_per_key=2)
    with running_server(stories_path, api_keys=["k1", "k2"], limits=lim) as srv:
        c1, c2 = djinn.connect(srv.url, api_key="k1"), djinn.connect(srv.url, api_key="k2")
        s = c1.session()
        with pytest.raises(djinn.LimitExceeded, match="max_new_tokens"):
            s.generate(STORY, max_new_tokens=17)
        with pytest.raises(djinn.LimitExceeded, match="tokens"):
            s.generate(list(range(1, 10)))
        with pytest.raises(djinn.LimitExceeded, match="characters"):
            s.generate("x" * 41)
        stream = s.stream(STORY, max_new_tokens=4, breakpoints=[djinn.Breakpoint(SITE)])
        ev = next(stream)
        with pytest.raises(djinn.LimitExceeded, match="breakpoints"):
            s.fork()  # a fork made at the pause would be a second paused session
        other = c1.session()
        with pytest.raises(djinn.LimitExceeded, match="breakpoints"):
            next(other.stream(STORY, breakpoints=[djinn.Breakpoint(SITE)]))
        assert c2.session().stream(STORY, max_new_tokens=2, breakpoints=[djinn.Breakpoint(SITE)])  # k2 may
        ev.resume()
        list(stream)
        assert next(other.stream(STORY, max_new_tokens=2, breakpoints=[djinn.Breakpoint(SITE)]))  # freed
        c1.session()
        with pytest.raises(djinn.LimitExceeded, match="sessions"):
            c1.session()
        with pytest.raises(djinn.LimitExceeded):
            s.fork()
        s.close()
        s = c1.session()  # room again
        assert c2.session() and s.generate(STORY, max_new_tokens=3).token_ids
        cks = [s.checkpoint() for _ in range(2)]
        with pytest.raises(djinn.LimitExceeded, match="checkpoints"):
            s.checkpoint()
        assert c2.session().generate(STORY, max_new_tokens=1) and c2.sessions()  # k2 keeps its own quota
        cks[0].delete()
        s.checkpoint()  # room again
        c1.close()
        c2.close()


# ---------------------------------------------------------------- seeded fuzz

def close_quietly(client, sid: str) -> None:
    try:
        client._backend.call("close_session", sid)
    except djinn.DjinnError:
        pass


FIELDS = ["type", "protocol", "prompt", "params", "activation", "site", "vector", "scale", "steps", "positions",
          "max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop_tokens", "return_logits",
          "interventions", "breakpoints", "factor", "tensor", "mean", "model", "ids", "text", "id"]
TYPES = ["hello", "generate", "resume", "cancel", "steer", "scale", "replace", "ablate", "capture", "breakpoint",
         "token", "x"]


def rand_tensor(rng: random.Random) -> torch.Tensor:
    shape = [rng.choice([0, 1, 2, 5, 64]) for _ in range(rng.randint(0, 3))]
    dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool, torch.float64])
    t = torch.randn(shape).to(dtype) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype)
    if dtype.is_floating_point and t.numel() and rng.random() < 0.3:
        t.view(-1)[0] = rng.choice([math.nan, math.inf])
    return t


def rand_value(rng: random.Random, depth: int = 0):
    r = rng.random()
    if depth > 3 or r < 0.35:
        return rng.choice([None, True, False, 0, -1, 1, 7, 2 ** 63 - 1, -2 ** 63, 2 ** 64 - 1, 0.5, math.nan,
                           math.inf, -0.0, "", "all", SITE, "blocks.*.hook_resid_post", "hook_embed", STORY,
                           "\x00\udcff".encode("utf-8", "surrogatepass").decode("utf-8", "replace"),
                           rng.choice(TYPES), rng.randbytes(rng.randint(0, 20))])
    if r < 0.5:
        return rand_tensor(rng)
    if r < 0.55:
        return msgpack.ExtType(rng.choice([TENSOR_EXT, 5]), rng.randbytes(rng.randint(0, 40)))
    if r < 0.75:
        return [rand_value(rng, depth + 1) for _ in range(rng.randint(0, 5))]
    return rand_map(rng, depth + 1)


def rand_map(rng: random.Random, depth: int = 0) -> dict:
    d = {"type": rng.choice(TYPES)} if rng.random() < 0.8 else {}
    for _ in range(rng.randint(0, 5)):
        d[rng.choice(FIELDS)] = rand_value(rng, depth)
    if d.get("type") in ("steer", "scale", "replace", "ablate", "capture", "breakpoint") and rng.random() < 0.7:
        d["site"] = rng.choice([SITE, "hook_embed", "blocks.*.hook_mlp_out", "blocks.0.attn.hook_z", "nope"])
    return d


def rand_frame(rng: random.Random, valid: list[bytes]) -> bytes:
    r = rng.random()
    if r < 0.2:
        return rng.randbytes(rng.randint(0, 200))
    if r < 0.45:  # a valid frame, mutated
        b = bytearray(rng.choice(valid))
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            if op < 0.4 and b:
                b[rng.randrange(len(b))] = rng.randrange(256)
            elif op < 0.7 and b:
                del b[rng.randrange(len(b)):]
            else:
                b[rng.randrange(len(b) + 1):0] = rng.randbytes(rng.randint(1, 8))
        return bytes(b)
    m = rand_map(rng)
    if rng.random() < 0.5:  # a generate with random params: reaches the engine's validation
        m = {"type": "generate", "prompt": rng.choice([STORY, [1, 2, 3], [], rand_value(rng)]),
             "params": {rng.choice(FIELDS[10:19]): rand_value(rng) for _ in range(rng.randint(0, 3))}
             | ({"interventions": [rand_map(rng)]} if rng.random() < 0.5 else {})}
    try:
        return pack(m)
    except djinn.DjinnError:
        return rng.randbytes(10)


def test_fuzz_frames_and_bodies(server, client):
    rng = random.Random(int(os.environ.get("DJINN_FUZZ_SEED", "20240611")))  # fixed unless asked otherwise
    torch.manual_seed(0)
    # a bystander paused at a breakpoint all along, and one that keeps generating meanwhile
    expected = client.session().generate(STORY, max_new_tokens=8).token_ids
    bystander = client.session()
    by_stream = bystander.stream(STORY, max_new_tokens=8, breakpoints=[djinn.Breakpoint(SITE, steps=[2])])
    by_tokens = []
    for by_ev in by_stream:
        if isinstance(by_ev, djinn.Paused):
            break
        by_tokens.append(by_ev.token_id)
    busy_errors, busy_runs = [], [0]
    stop = threading.Event()

    def keep_busy():
        c = djinn.connect(server.url)
        try:
            while not stop.is_set():
                with c.session() as one:
                    got = one.generate(STORY, max_new_tokens=8).token_ids
                if got != expected:
                    busy_errors.append(got)
                busy_runs[0] += 1
                stop.wait(0.05)
        except Exception as e:
            busy_errors.append(e)
        c.close()

    busy = threading.Thread(target=keep_busy)
    busy.start()
    valid = [hello(), generate(), generate(max_new_tokens=3, interventions=[encode_intervention(
        djinn.Steer(SITE, torch.ones(64)))]), pack({"type": "resume", "activation": torch.zeros(1, 64)}),
        pack({"type": "resume", "activation": None}), pack({"type": "cancel"})]

    # 1. the first frames of fresh streams
    for i in range(200):
        victim = client.session().id
        frames = [rand_frame(rng, valid)] if rng.random() < 0.5 else [hello(), rand_frame(rng, valid)]
        with open_ws(server, victim) as ws:
            for f in frames:
                try:
                    ws.send(f)
                except websockets.exceptions.ConnectionClosed:
                    break
            while True:
                try:
                    msg = unpack(ws.recv(timeout=2))
                except websockets.exceptions.ConnectionClosedOK:
                    break
                except TimeoutError:  # e.g. a lone valid hello: the server waits for the generate frame
                    break
                assert isinstance(msg, dict) and msg.get("type") in ("hello", "error", "token", "paused", "done")
                if msg["type"] == "error":
                    assert msg["code"] in ERRORS_BY_CODE and msg["code"] != "internal", (i, frames, msg)
                    break
                if msg["type"] in ("paused", "done"):
                    break
        close_quietly(client, victim)

    # 2. frames in the middle of a paused stream
    s = client.session()
    ws, _ = paused_stream(server, s.id, steps="all")
    for i in range(400):
        frame = rand_frame(rng, valid)
        try:
            ws.send(frame)
            r = reply_to(ws)
        except websockets.exceptions.ConnectionClosed:  # the fuzz resumed and finished the stream: start again
            ws.close()
            close_quietly(client, s.id)
            s = client.session()
            ws, _ = paused_stream(server, s.id, steps="all")
            continue
        if not r["ok"]:
            assert r["code"] in ERRORS_BY_CODE and r["code"] != "internal", (i, frame, r)
    ws.close()

    # 3. REST bodies
    victim = client.session().id
    routes = [("POST", "/api/sessions"), ("GET", "/api/sessions"), ("GET", f"/api/sessions/{victim}"),
              ("POST", f"/api/sessions/{victim}/generate"), ("PUT", f"/api/sessions/{victim}/interventions"),
              ("POST", f"/api/sessions/{victim}/resume"), ("POST", f"/api/sessions/{victim}/cancel"),
              ("POST", f"/api/sessions/{victim}/fork"), ("POST", f"/api/sessions/{victim}/checkpoint"),
              ("POST", "/api/tokenize"), ("POST", "/api/detokenize"), ("GET", "/api/checkpoints/zz"),
              ("POST", "/v1/completions"), ("GET", "/v1/models"), ("DELETE", "/api/sessions/zz")]
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for i in range(400):
            verb, path = rng.choice(routes)
            kind = rng.random()
            if kind < 0.3:
                body, ctype = rng.randbytes(rng.randint(0, 100)), rng.choice(["application/msgpack",
                                                                              "application/json", ""])
            elif kind < 0.65:
                m = rand_map(rng)
                if path.endswith("/generate") or path.endswith("/completions"):
                    m = {"prompt": rng.choice([STORY, [1, 5], rand_value(rng)]), "max_new_tokens": 3,
                         rng.choice(FIELDS + ["max_tokens", "logprobs", "stop", "n", "djinn_interventions"]):
                             rand_value(rng)}
                    if path.endswith("/completions"):
                        m = {"model": "stories260K", **{k: v for k, v in m.items() if k != "max_new_tokens"}}
                try:
                    body, ctype = pack(m), "application/msgpack"
                except djinn.DjinnError:
                    body, ctype = b"", ""
            else:
                m = rand_map(rng)
                body = json.dumps(m, default=lambda o: None).encode()
                ctype = "application/json"
            r = http.request(verb, path, content=body, headers={"Content-Type": ctype} if ctype else {})
            assert r.status_code < 500, (i, verb, path, body, r.text)
            if r.status_code >= 400:
                err = r.json()["error"]
                assert err["code"] in ERRORS_BY_CODE and "Traceback" not in err["message"], (i, path, err)

    stop.set()
    busy.join(60)
    assert not busy_errors and busy_runs[0] > 0
    # the bystander resumes as if nothing happened; the server is healthy
    by_ev.resume()
    assert by_tokens + [e.token_id for e in by_stream if isinstance(e, djinn.Token)] == expected
    assert bystander.info()["state"] == "idle"
    assert client.session().generate(STORY, max_new_tokens=8).token_ids == expected
    assert httpx.get(server.url + "/healthz", timeout=WAIT).json()["status"] == "ok"


def test_closed_connections_and_odd_frames_read_as_typed_errors():
    from websockets.exceptions import ConnectionClosed
    from websockets.frames import Close

    from djinn.client.remote import closed_error, frame_map

    too_big = closed_error(ConnectionClosed(Close(1009, "message too big"), None))
    assert isinstance(too_big, djinn.FrameTooLarge) and "message too big" in str(too_big)
    gone = closed_error(ConnectionClosed(Close(1011, "engine stopped"), None))
    assert isinstance(gone, djinn.DjinnError) and not isinstance(gone, djinn.FrameTooLarge)
    assert "code 1011: engine stopped" in str(gone)
    assert "code None" in str(closed_error(ConnectionClosed(None, None)))  # dropped without a close frame
    assert frame_map(pack({"type": "token"})) == {"type": "token"} and frame_map("text") == {}
    with pytest.raises(djinn.DjinnError, match="not a map"):
        frame_map(pack([1, 2]))

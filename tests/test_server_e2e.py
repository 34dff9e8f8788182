"""End to end: one scenario run over the embedded engine and over a real server (HTTP + WebSocket on
loopback) gives identical results; 16 clients at once, half of them paused, nobody waits on a paused
session; a client that disconnects mid-pause leaves nothing behind once the pause time-to-live passes;
the asyncio client."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
import websockets.sync.client

import djinn
from djinn.client.aio import AsyncSession, connect_async
from djinn.client.embedded import EmbeddedBackend
from djinn.engine.engine import Engine
from djinn.wire import PROTOCOL_VERSION, encode_intervention, pack, unpack
from serverutil import WAIT, make_models, running_server

STORY = "Once upon a time"
SITE = "blocks.2.hook_resid_post"


def _steer_vector() -> torch.Tensor:
    return torch.randn(64, generator=torch.Generator().manual_seed(7))


def scenario(client: djinn.Client) -> dict:
    """Everything the public API does, returning what must be identical on every backend."""
    R: dict = {"models": client.models()}
    assert [m.name for m in R["models"]] == ["stories260K", "tiny-bf16"]

    # generate, then continue the same session with text, then with nothing
    s = client.session("stories260K")
    out = s.generate(STORY, max_new_tokens=16)
    assert out.text.startswith(", there was a little girl named Lily")
    R["gen"] = (out.text, out.token_ids, out.finish_reason)
    R["cont"] = [s.generate(" and then", max_new_tokens=8).token_ids, s.generate([], max_new_tokens=4).token_ids]
    info = s.info()
    assert info["state"] == "idle" and info["model"] == "stories260K"
    R["info"] = {k: v for k, v in info.items() if k != "id"}
    assert s.id in {d["id"] for d in client.sessions()}
    R["tok"] = client.tokenize(STORY)
    R["detok"] = client.detokenize(out.token_ids)
    assert R["detok"] == out.text

    # return_logits: [n_new, vocab], and greedy tokens are their argmax
    o = client.session().generate([1, 403, 9], max_new_tokens=5, return_logits=True)
    assert o.logits.shape == (5, 512) and o.logits.dtype == torch.float32
    assert o.logits.argmax(-1).tolist() == o.token_ids
    R["logits"] = o.logits

    # a stream with breakpoints, resumed unchanged: the same tokens as an uninterrupted run
    s3 = client.session()
    seen = []
    for ev in s3.stream(STORY, max_new_tokens=8, breakpoints=[djinn.Breakpoint(SITE, steps=[0, 3])]):
        if isinstance(ev, djinn.Paused):
            assert ev.activation.dtype == torch.float32 and ev.activation.shape[-1] == 64
            seen.append((ev.site, ev.step, ev.positions, ev.activation.clone()))
            with pytest.raises(djinn.InvalidTensor, match="shape"):  # a bad edit changes nothing
                ev.resume(torch.zeros(3, 3))
            ev.resume()
        elif isinstance(ev, djinn.Token):
            seen.append((ev.token_id, ev.text, ev.step))
    tokens = [e[0] for e in seen if isinstance(e[0], int)]
    assert tokens == out.token_ids[:8]
    assert [e[1] for e in seen if isinstance(e[0], str)] == [0, 3]
    R["stream"] = seen

    # ... and resumed with an edit: the continuation changes
    s4 = client.session()
    edited = []
    for ev in s4.stream(STORY, max_new_tokens=8, breakpoints=[djinn.Breakpoint(SITE, steps=[1])]):
        if isinstance(ev, djinn.Paused):
            assert ev.activation.shape == (1, 64)
            ev.resume(-3.0 * ev.activation)
        elif isinstance(ev, djinn.Token):
            edited.append(ev.token_id)
    assert edited[0] == out.token_ids[0] and edited != out.token_ids[:8]
    R["edited"] = edited

    # captures
    o = client.session().generate(STORY, max_new_tokens=3,
                                  interventions=[djinn.Capture("blocks.*.hook_resid_post", steps=[0, 1])])
    assert set(o.captures) == {(f"blocks.{i}.hook_resid_post", st) for i in range(5) for st in (0, 1)}
    assert o.captures[(SITE, 1)].shape == (1, 64)
    R["captures"] = o.captures

    # declarative edits: steering changes the output; scale, replace, ablate run
    vec = _steer_vector()
    steer = djinn.Steer(SITE, vec, scale=4.0)
    steered = client.session().generate(STORY, max_new_tokens=16, interventions=[steer])
    assert steered.token_ids != out.token_ids
    R["steered"] = steered.token_ids
    R["edits"] = [client.session().generate(STORY, max_new_tokens=6, interventions=[iv]).token_ids for iv in [
        djinn.Scale("blocks.1.hook_mlp_out", 0.0),
        djinn.Replace("blocks.1.hook_resid_post", torch.ones(2, 64), positions=[1, 2]),
        djinn.Ablate("blocks.3.hook_attn_out", steps=[0]),
        djinn.Steer("blocks.0.attn.hook_z", torch.ones(8, 8), scale=0.5, steps=range(0, 3)),
    ]]

    # persistent interventions equal the same ones per call
    s6 = client.session()
    s6.set_interventions([steer])
    assert s6.info()["interventions"] == 1
    assert s6.generate(STORY, max_new_tokens=16).token_ids == steered.token_ids
    s6.set_interventions([])

    # checkpoint and restore: the restored session continues exactly like the original
    s7 = client.session()
    s7.generate(STORY, max_new_tokens=6)
    ck = s7.checkpoint()
    st = ck.wait()
    assert st["done"] and st["n_tokens"] == s7.info()["n_tokens"]
    after = s7.generate([], max_new_tokens=6).token_ids
    r = ck.restore()
    assert r.generate([], max_new_tokens=6).token_ids == after
    ck.delete()
    with pytest.raises(djinn.UnknownCheckpoint):
        ck.status()
    R["checkpoint"] = after

    # fork: both continue the same way
    f = s7.fork()
    a, b = s7.generate(" and", max_new_tokens=5).token_ids, f.generate(" and", max_new_tokens=5).token_ids
    assert a == b
    R["fork"] = a

    # fork at a pause: the fork waits at the same site; each branch is resumed with its own edit
    s9 = client.session()
    plain = client.session().generate(STORY, max_new_tokens=8).token_ids
    branch = s9.stream(STORY, max_new_tokens=8, breakpoints=[djinn.Breakpoint(SITE, steps=[2])])
    ev = next(e for e in branch if isinstance(e, djinn.Paused))  # after the tokens of steps 0 and 1
    f9 = s9.fork()
    assert f9.info()["state"] == "paused"
    ev.resume(ev.activation * -3.0)
    edited = [e for e in branch if isinstance(e, djinn.Done)][0].result.token_ids
    attached = f9.attach()
    again = next(attached)
    assert isinstance(again, djinn.Paused) and (again.site, again.step) == (SITE, 2)
    assert torch.equal(again.activation, ev.activation)
    again.resume()
    with pytest.raises(djinn.NotPaused):  # the original's pause is over: its event cannot resume anything
        ev.resume()
    unchanged = [e for e in attached if isinstance(e, djinn.Done)][0].result.token_ids
    assert unchanged == plain and edited != plain and edited[:2] == plain[:2]
    R["fork_at_pause"] = (edited, unchanged)
    f9.close()
    s9.close()

    # a bfloat16 model: activations and captures travel in bfloat16
    t = client.session("tiny-bf16")
    acts = []
    for ev in t.stream([1, 2, 3], max_new_tokens=4, breakpoints=[djinn.Breakpoint("blocks.1.hook_resid_post",
                                                                                 steps=[0, 2])],
                       interventions=[djinn.Capture("hook_embed", steps=[0])], return_logits=True):
        if isinstance(ev, djinn.Paused):
            assert ev.activation.dtype == torch.bfloat16
            acts.append(ev.activation)
            ev.resume(ev.activation * 2)
        elif isinstance(ev, djinn.Done):
            assert ev.result.captures[("hook_embed", 0)].dtype == torch.bfloat16
            R["bf16"] = (ev.result.token_ids, ev.result.captures, ev.result.logits, acts)
    # ... unless the client asks for another dtype
    for ev in t.stream([4, 5], max_new_tokens=2, activation_dtype="float32",
                       breakpoints=[djinn.Breakpoint("blocks.0.hook_resid_post", steps=[0])],
                       interventions=[djinn.Capture("hook_embed", steps=[0])]):
        if isinstance(ev, djinn.Paused):
            assert ev.activation.dtype == torch.float32
            R["bf16_as_f32"] = ev.activation
            ev.resume()
        elif isinstance(ev, djinn.Done):
            assert ev.result.captures[("hook_embed", 0)].dtype == torch.float32

    # typed errors, and the sessions carry on
    with pytest.raises(djinn.UnknownSite):
        s.generate("x", interventions=[djinn.Capture("blocks.9.hook_nope")])
    with pytest.raises(djinn.UnknownModel):
        client.session("no-such-model")
    with pytest.raises(djinn.InvalidTensor):
        s.generate("x", interventions=[djinn.Steer(SITE, torch.full((64,), float("nan")))])
    with pytest.raises(djinn.TokenOutOfRange):
        s.generate([1, 999])
    R["after_errors"] = s.generate([], max_new_tokens=4).token_ids

    # an abandoned stream is cancelled; the session stays usable
    s8 = client.session()
    for ev in s8.stream(STORY, max_new_tokens=50):
        break
    assert s8.info()["state"] == "idle"  # (how many tokens it made before the cancel is timing, not compared)
    assert len(s8.generate(" and", max_new_tokens=4).token_ids) == 4

    for sess in (s, s3, s4, s6, s7, r, f, t, s8):
        sess.close()
    with pytest.raises(djinn.UnknownSession):
        s.info()
    return R


def _same(a, b, path="result") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), path
        for k in a:
            _same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def server(stories_path):
    with running_server(stories_path) as srv:
        yield srv


@pytest.fixture(scope="module")
def embedded_reference(stories_path):
    with djinn.Client(EmbeddedBackend(Engine(make_models(stories_path)))) as c:
        return scenario(c)


@pytest.mark.parametrize("backend", ["embedded", "server"])
def test_same_results_embedded_and_remote(backend, stories_path, server, embedded_reference):
    if backend == "embedded":
        client = djinn.Client(EmbeddedBackend(Engine(make_models(stories_path))))
    else:
        client = djinn.connect(server.url)
    with client:
        _same(embedded_reference, scenario(client))


def test_sixteen_clients_half_paused(server):
    """8 clients pause at a breakpoint and stay paused for seconds; the 8 others run to the end meanwhile.
    Every token equals a solo greedy run."""
    prompts = [[1, 30 + 7 * i, 200 + i] for i in range(16)]
    n_new = 24
    solo = djinn.connect(server.url)
    expected = [solo.session().generate(p, max_new_tokens=n_new).token_ids for p in prompts]
    got: dict[int, list[int]] = {}
    paused = [threading.Event() for _ in range(8)]
    runners_done = threading.Event()
    finished_at, resumed_at, state_while_paused, errors = {}, {}, {}, []
    n_runners_left = [8]
    lock = threading.Lock()

    def pauser(i: int) -> None:
        try:
            c = djinn.connect(server.url)
            s = c.session()
            toks = []
            for ev in s.stream(prompts[i], max_new_tokens=n_new, breakpoints=[djinn.Breakpoint(SITE, steps=[2])]):
                if isinstance(ev, djinn.Paused):
                    t0 = time.monotonic()
                    paused[i].set()
                    assert runners_done.wait(60), "the running clients did not finish while these were paused"
                    state_while_paused[i] = s.info()["state"]
                    time.sleep(max(0.0, 2.0 - (time.monotonic() - t0)))  # paused for a couple of seconds
                    resumed_at[i] = time.monotonic()
                    ev.resume()
                elif isinstance(ev, djinn.Token):
                    toks.append(ev.token_id)
            got[i] = toks
            c.close()
        except BaseException as e:  # reported by the main thread
            errors.append(e)
            paused[i].set()

    def runner(i: int) -> None:
        try:
            c = djinn.connect(server.url)
            for e in paused:
                assert e.wait(60)
            got[i] = c.session().generate(prompts[i], max_new_tokens=n_new).token_ids
            finished_at[i] = time.monotonic()
            c.close()
        except BaseException as e:
            errors.append(e)
        finally:
            with lock:
                n_runners_left[0] -= 1
                if n_runners_left[0] == 0:
                    runners_done.set()

    threads = [threading.Thread(target=pauser, args=(i,)) for i in range(8)]
    threads += [threading.Thread(target=runner, args=(i,)) for i in range(8, 16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert all(state_while_paused[i] == "paused" for i in range(8)), state_while_paused
    assert max(finished_at.values()) < min(resumed_at.values())
    for i in range(16):
        assert got[i] == expected[i], f"client {i}"
    solo.close()


def test_disconnect_mid_pause_is_freed_by_the_ttl(stories_path):
    with running_server(stories_path, pause_ttl=1.0) as srv:
        c = djinn.connect(srv.url)
        bystander = c.session()
        bystander.generate(STORY, max_new_tokens=4)
        expected = c.session().generate([1, 40, 50], max_new_tokens=12).token_ids
        base = srv.service.call("pool_usage")
        for abrupt in (False, True):
            s = c.session()
            ws = websockets.sync.client.connect(srv.url.replace("http", "ws") + f"/api/sessions/{s.id}/stream",
                                                proxy=None, legacy=True, open_timeout=WAIT)
            ws.send(pack({"type": "hello", "protocol": PROTOCOL_VERSION}))
            ws.send(pack({"type": "generate", "prompt": STORY, "params": {
                "max_new_tokens": 30, "breakpoints": [encode_intervention(djinn.Breakpoint(SITE, steps=[3]))]}}))
            assert unpack(ws.recv())["type"] == "hello"
            while (msg := unpack(ws.recv()))["type"] != "paused":
                assert msg["type"] == "token"
            if abrupt:
                ws.socket.close()  # the client vanishes without a close handshake
            else:
                ws.close()
            time.sleep(0.3)
            assert s.info()["state"] == "paused"  # nothing is cancelled at once
            assert srv.service.call("pool_usage") != base
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                try:
                    s.info()
                except djinn.UnknownSession:
                    break
                time.sleep(0.1)
            with pytest.raises(djinn.UnknownSession):
                s.info()
            assert srv.service.call("pool_usage") == base
        # a client that reconnects in time attaches to its paused session and carries on
        s = c.session()
        stream = s.stream([1, 40, 50], max_new_tokens=12, breakpoints=[djinn.Breakpoint(SITE, steps=[3])])
        next(e for e in stream if isinstance(e, djinn.Paused))  # (this stream is abandoned, still open)
        events = s.attach()  # takes the call over; the abandoned stream is told it was cancelled
        ev = next(events)
        assert isinstance(ev, djinn.Paused) and ev.step == 3
        ev.resume()
        assert [e for e in events if isinstance(e, djinn.Done)][0].result.token_ids == expected
        with pytest.raises(djinn.Cancelled):
            list(stream)
        # the server and the other sessions carry on
        assert c.session().generate([1, 40, 50], max_new_tokens=12).token_ids == expected
        assert bystander.info()["state"] == "idle"
        c.close()


def test_connected_client_past_the_ttl(stories_path):
    """A client that stays connected but never resumes: the engine frees the session at the TTL and the
    client is told, the same way embedded and remote."""
    with running_server(stories_path, pause_ttl=0.5) as srv:
        for client in (djinn.Client(EmbeddedBackend(Engine(make_models(stories_path), pause_ttl=0.5))),
                       djinn.connect(srv.url)):
            s = client.session()
            stream = s.stream(STORY, max_new_tokens=8, breakpoints=[djinn.Breakpoint(SITE, steps=[1])])
            ev = next(e for e in stream if isinstance(e, djinn.Paused))
            time.sleep(1.5)
            with pytest.raises(djinn.UnknownSession):
                ev.resume()
            with pytest.raises(djinn.SessionExpired, match="time-to-live"):
                next(stream)
            with pytest.raises(djinn.UnknownSession):
                s.info()
            assert client.session().generate(STORY, max_new_tokens=2).token_ids
            client.close()


def test_asyncio_client(server):
    sync = djinn.connect(server.url)
    ref = sync.session().generate(STORY, max_new_tokens=10)
    ref_steer = sync.session().generate(STORY, max_new_tokens=10,
                                        interventions=[djinn.Steer(SITE, _steer_vector(), scale=4.0)])

    async def main():
        async with await connect_async(server.url) as client:
            assert [m.name for m in await client.models()] == ["stories260K", "tiny-bf16"]
            s = await client.session()
            out = await s.generate(STORY, max_new_tokens=10)
            assert out.token_ids == ref.token_ids and out.text == ref.text
            # concurrent streams on one loop, each paused and resumed
            async def one(edit: bool):
                sess = await client.session()
                toks = []
                async for ev in sess.stream(STORY, max_new_tokens=10, breakpoints=[djinn.Breakpoint(SITE)]):
                    if isinstance(ev, djinn.Paused):
                        assert ev.activation.shape == (5, 64)
                        await ev.resume(ev.activation if not edit else ev.activation * 0)
                    elif isinstance(ev, djinn.Token):
                        toks.append(ev.token_id)
                await sess.close()
                return toks
            plain, zeroed = await asyncio.gather(one(False), one(True))
            assert plain == ref.token_ids and zeroed != ref.token_ids
            st = await client.session()
            await st.set_interventions([djinn.Steer(SITE, _steer_vector(), scale=4.0)])
            assert (await st.generate(STORY, max_new_tokens=10)).token_ids == ref_steer.token_ids
            ck = await s.checkpoint()
            await ck.wait()
            r = await ck.restore()
            f = await s.fork()
            a = (await r.generate([], max_new_tokens=4)).token_ids
            assert a == (await f.generate([], max_new_tokens=4)).token_ids
            # fork at a pause, then attach to the fork
            p = await client.session()
            async for ev in p.stream(STORY, max_new_tokens=10, breakpoints=[djinn.Breakpoint(SITE)]):
                if isinstance(ev, djinn.Paused):
                    fork = await p.fork()
                    await ev.resume(ev.activation * 0)
            fork_result = None
            async for ev in fork.attach():
                if isinstance(ev, djinn.Paused):
                    await ev.resume()
                elif isinstance(ev, djinn.Done):
                    fork_result = ev.result.token_ids
            assert fork_result == ref.token_ids
            with pytest.raises(djinn.UnknownSite):
                async for _ in s.stream("x", breakpoints=[djinn.Breakpoint("nowhere")]):
                    pass
            with pytest.raises(djinn.UnknownSession):
                await AsyncSession(s._backend, "missing").info()
            # calls of concurrent tasks take turns on the control socket, each getting its own reply
            mine = [s, st, r, f] * 5
            infos = await asyncio.gather(*[x.info() for x in mine])
            assert [i["id"] for i in infos] == [x.id for x in mine]
            # a call cancelled before its reply drops the socket; the next call opens another
            task = asyncio.ensure_future(s.info())
            await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert (await s.info())["id"] == s.id

    asyncio.run(main())
    sync.close()


def test_control_sockets_of_ended_threads_are_closed(server):
    """Each calling thread gets its own control socket; those of threads that have ended are closed when
    another thread opens one, so a client used from many short-lived threads holds no more than it needs."""
    client = djinn.connect(server.url)
    backend = client._backend
    for _ in range(6):
        t = threading.Thread(target=lambda: client.models())
        t.start()
        t.join()
    client.models()  # this thread's socket: the ended threads' sockets go
    assert len(backend._controls) == 1 and backend._controls[0][0] is threading.current_thread()
    client.close()

"""Replicas behind a load balancer: two `djinn serve --replica` processes behind nginx, configured from
deploy/nginx/djinn.conf, reached through the balancer's one URL by the Python clients."""
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

import djinn
from djinn.client.aio import connect_async
from djinn.engine.engine import Engine
from djinn.errors import InvalidRequest, UnknownCheckpoint, UnknownSession
from djinn.models.loading import load_random
from djinn.replica import new_id, replica_name, replica_of
from serverutil import TINY, WAIT

ROOT = Path(__file__).resolve().parent.parent
NGINX = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
needs_nginx = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx-light)")
PROMPT = "Once upon a time"
SITE = "blocks.1.hook_resid_post"


def test_ids_name_their_replica():
    assert replica_of(new_id("a-1")) == "a-1" and replica_of(new_id(None)) is None
    assert new_id("a") != new_id("a") and len(new_id(None)) == 22  # 128 random bits either way
    for bad in ("", "a.b", "a/b", "x" * 33, 7):
        with pytest.raises(InvalidRequest):
            replica_name(bad)
    model = load_random(TINY, torch.float32, torch.device("cpu"), seed=1, name="tiny")
    engine = Engine([model], kv_blocks=8, replica="a")
    sid = engine.create_session("k")
    cid = engine.checkpoint(sid, "k")
    assert {replica_of(i) for i in (sid, cid, engine.fork(sid, "k"), engine.restore(cid, "k"))} == {"a"}
    with pytest.raises(UnknownSession, match="names replica 'b', this server is replica a"):
        engine.session_info("b." + sid.split(".")[1], "k")
    with pytest.raises(InvalidRequest):
        Engine([model], kv_blocks=8, replica="a.b")
    assert "." not in Engine([model], kv_blocks=8).create_session("k")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + WAIT
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args[0]} exited with {proc.returncode}: {log.read_text()}")
        try:
            if httpx.get(url + "/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{url} did not answer /healthz within {WAIT:g} s"
        time.sleep(0.1)


def nginx_conf(tmp: Path, port: int, ports: dict[str, int]) -> Path:
    """The repo's configuration with the test's ports, inside a main configuration that keeps every file of
    nginx in `tmp`."""
    site = (ROOT / "deploy" / "nginx" / "djinn.conf").read_text()
    for old, new in (("127.0.0.1:8421", f"127.0.0.1:{ports['a']}"), ("127.0.0.1:8422", f"127.0.0.1:{ports['b']}"),
                     ("listen 8420;", f"listen 127.0.0.1:{port};")):
        assert old in site, f"deploy/nginx/djinn.conf no longer says {old!r}"
        site = site.replace(old, new)
    (tmp / "djinn.conf").write_text(site)
    built = subprocess.run([NGINX, "-V"], capture_output=True, text=True).stderr
    # every temporary folder of the modules nginx was built with goes in tmp: the built-in paths may not be writable
    optional = [m for m in ("fastcgi", "uwsgi", "scgi") if f"--without-http_{m}_module" not in built]
    temps = [f"{m}_temp_path {tmp}/{m};" for m in ("client_body", "proxy", *optional)]
    main = tmp / "nginx.conf"
    # run as root, nginx's workers would be `nobody`, who cannot enter pytest's private tmp folders
    main.write_text("\n".join([
        "user root;" if os.geteuid() == 0 else "", "worker_processes 1;", f"pid {tmp}/nginx.pid;",
        f"error_log {tmp}/error.log;", "events { worker_connections 256; }",
        "http {", "access_log off;", *temps, f"include {tmp}/djinn.conf;", "}"]))
    return main


@pytest.fixture(scope="module")
def replicas(stories_path, tmp_path_factory):
    """{"a": url, "b": url, "lb": the balancer's url}."""
    tmp = tmp_path_factory.mktemp("replicas")
    ports = {"a": free_port(), "b": free_port()}
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    procs, urls = [], {}
    try:
        for name, port in ports.items():  # both start at once: most of a start is importing torch
            log = tmp / f"{name}.log"
            with log.open("w") as out:
                procs.append((subprocess.Popen(
                    [sys.executable, "-m", "djinn", "serve", "--model", str(stories_path), "--device", "cpu",
                     "--port", str(port), "--replica", name, "--kv-memory", "16M", "--log-level", "warning"],
                    env=env, stdout=out, stderr=subprocess.STDOUT), log))
            urls[name] = f"http://127.0.0.1:{port}"
        lb = free_port()
        log = tmp / "error.log"
        procs.append((subprocess.Popen([NGINX, "-p", str(tmp), "-e", str(log), "-c", str(nginx_conf(tmp, lb, ports)),
                                        "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT),
                      log))
        urls["lb"] = f"http://127.0.0.1:{lb}"
        for (proc, log), url in zip(procs, urls.values()):
            wait_healthy(url, proc, log)
        yield urls
    finally:
        for proc, _ in procs:
            proc.terminate()
        for proc, _ in procs:
            proc.wait(timeout=30)


@needs_nginx
def test_each_session_is_served_by_its_replica(replicas):
    client = djinn.connect(replicas["lb"])
    direct = {name: djinn.connect(replicas[name]) for name in "ab"}
    sessions = [client.session() for _ in range(8)]
    by_replica = {name: {s.id for s in sessions if replica_of(s.id) == name} for name in "ab"}
    assert by_replica["a"] and by_replica["b"] and sum(map(len, by_replica.values())) == 8  # spread, all named
    for name, ids in by_replica.items():  # each replica holds exactly the sessions its ids name
        assert {i["id"] for i in direct[name].sessions()} == ids
    # Calls go replica by replica, so that round robin alone would send some of them to the other one.
    sessions.sort(key=lambda x: x.id)
    with direct["a"].session() as first:
        ref = first.generate(PROMPT, max_new_tokens=6).token_ids
    for s in sessions:
        assert s.generate(PROMPT, max_new_tokens=6).token_ids == ref  # over REST, routed by the path
        # djinn_session is in the body: routed by the header
        r = httpx.post(replicas["lb"] + "/v1/completions", headers={"X-Djinn-Session": s.id}, timeout=WAIT,
                       json={"model": "stories260K", "prompt": " and", "max_tokens": 2, "djinn_session": s.id})
        assert r.status_code == 200, r.text
    for s in sessions:  # each from a thread of its own, which opens a control socket: routed by the header
        with ThreadPoolExecutor(1) as thread:
            assert thread.submit(s.info).result()["n_tokens"] > 0
    for s in (sessions[0], next(x for x in sessions if replica_of(x.id) != replica_of(sessions[0].id))):
        home = replica_of(s.id)
        pauses = 0
        for ev in s.stream(" there", max_new_tokens=4, breakpoints=[djinn.Breakpoint(SITE, steps=[0, 2])]):
            if isinstance(ev, djinn.Paused):
                pauses += 1
                ev.resume(ev.activation)
            elif isinstance(ev, djinn.Done):
                assert len(ev.result.token_ids) == 4
        assert pauses == 2
        fork = s.fork()
        ck = s.checkpoint()
        assert ck.wait()["done"]
        restored = ck.restore()
        assert {replica_of(fork.id), replica_of(ck.id), replica_of(restored.id)} == {home}
        assert fork.generate([], max_new_tokens=3).token_ids == restored.generate([], max_new_tokens=3).token_ids
        ck.delete()
        for x in (fork, restored):
            x.close()
    for s in sessions:
        s.close()
        with pytest.raises(UnknownSession):
            s.info()
    for c in (client, *direct.values()):
        c.close()


@needs_nginx
def test_the_asyncio_client_spreads_and_routes(replicas):
    async def main():
        client = await connect_async(replicas["lb"])
        sessions = [await client.session() for _ in range(4)]
        assert {replica_of(s.id) for s in sessions} == {"a", "b"}
        infos = await asyncio.gather(*[s.info() for s in sessions])
        assert [i["id"] for i in infos] == [s.id for s in sessions]
        for s in sessions:
            await s.close()
        await client.close()

    asyncio.run(main())


@needs_nginx
def test_an_id_of_another_replica_is_unknown(replicas):
    a, b = (djinn.connect(replicas[name]) for name in "ab")
    s = a.session()
    ck = s.checkpoint()
    with pytest.raises(UnknownSession, match="names replica 'a', this server is replica b"):
        b.session_by_id(s.id)
    with pytest.raises(UnknownCheckpoint):
        b._backend.call("restore", ck.id)
    r = httpx.post(f"{replicas['b']}/api/sessions/{s.id}/generate", json={"prompt": PROMPT}, timeout=WAIT)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_session"
    with pytest.raises(UnknownSession):
        next(iter(djinn.Session(b._backend, s.id).stream(PROMPT)))
    assert s.info()["id"] == s.id  # still there on its own replica
    ck.delete()
    s.close()
    a.close()
    b.close()

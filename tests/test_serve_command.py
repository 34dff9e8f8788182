"""The `djinn serve` command as users start it: a separate process on a loopback port, reached by the
official clients (djinn's remote client over WebSocket, the openai package), then stopped."""
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

import djinn


STARTUP: dict[str, str] = {}


@pytest.fixture(scope="module")
def served(stories_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "djinn", "serve", "--model", str(stories_path), "--device", "cpu",
                             "--port", str(port), "--log-level", "warning"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for line in proc.stdout:  # the startup line names what is served, before the server answers
            if line.startswith("djinn: serving"):
                STARTUP["line"] = line
                break
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"djinn serve exited with {proc.returncode}: {proc.stdout.read()}")
            try:
                if httpx.get(url + "/healthz", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "djinn serve did not answer /healthz within 120 s"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_pauses_resumes_and_checkpoints_over_the_wire(served, stories_path):
    local = djinn.connect(model=str(stories_path))
    ref = local.session().generate("Once upon a time", max_new_tokens=12, return_logits=True)
    local.close()
    client = djinn.connect(served)
    assert client.models()[0].name == "stories260K"
    s = client.session()
    pauses = 0
    for ev in s.stream("Once upon a time", max_new_tokens=12, return_logits=True,
                       breakpoints=[djinn.Breakpoint("blocks.2.hook_resid_post", steps=[0, 4])]):
        if isinstance(ev, djinn.Paused):
            pauses += 1
            ev.resume()
        elif isinstance(ev, djinn.Done):
            out = ev.result
    assert pauses == 2 and out.token_ids == ref.token_ids
    assert (out.logits - ref.logits).abs().max() < 1e-4  # another process, same weights and arithmetic
    ck = s.checkpoint()
    assert ck.wait()["done"]
    assert ck.restore().generate([], max_new_tokens=4).token_ids == s.generate([], max_new_tokens=4).token_ids
    client.close()


def test_serve_answers_the_openai_client(served):
    from openai import OpenAI

    oa = OpenAI(base_url=served + "/v1", api_key="unused")
    done = oa.completions.create(model="stories260K", prompt="Once upon a time", max_tokens=8, temperature=0)
    assert done.choices[0].text and done.usage.completion_tokens == 8


def test_the_names_serve_prints_are_the_openai_model_ids(served):
    ids = [m["id"] for m in httpx.get(served + "/v1/models", timeout=10).json()["data"]]
    assert ids == ["stories260K"]
    assert STARTUP["line"].startswith(f"djinn: serving {', '.join(ids)} on {served}")

"""`Session.generate()` without breakpoints comes back as one reply: embedded, the tokens stay on the engine
thread and the caller wakes once; remote, one REST request instead of a stream of frames. The result is the
stream's, bit for bit, and an interrupted embedded call ends its request and keeps the session."""
from __future__ import annotations

import signal

import pytest
import torch

import djinn
from djinn.client.embedded import EmbeddedBackend
from djinn.client.remote import RemoteBackend
from serverutil import running_server

SITE = "blocks.2.hook_resid_post"
STORY = "Once upon a time"


def streamed(session, **params):
    """The old way: the stream to its Done event."""
    for ev in session.stream(STORY, **params):
        if isinstance(ev, djinn.Done):
            return ev.result
    raise AssertionError("no Done event")


def params():
    return dict(max_new_tokens=12, return_logits=True, interventions=[
        djinn.Steer(SITE, torch.full((64,), 0.25), scale=2.0), djinn.Capture("blocks.1.hook_resid_post", steps=[0, 3])])


def assert_same(a, b) -> None:
    assert a.token_ids == b.token_ids and a.text == b.text
    assert torch.equal(a.logits, b.logits)
    assert a.captures.keys() == b.captures.keys() and all(torch.equal(a.captures[k], b.captures[k]) for k in a.captures)


def no_stream(*args, **kwargs):
    raise AssertionError("generate() without breakpoints opened a stream")


def test_embedded_generate_is_the_streams_result_without_its_events(stories_path, monkeypatch):
    client = djinn.connect(model=str(stories_path))
    try:
        ref = streamed(client.session(), **params())
        monkeypatch.setattr(EmbeddedBackend, "_events", no_stream)
        assert_same(client.session().generate(STORY, **params()), ref)
        with pytest.raises(djinn.UnknownSite):  # errors come back as before
            client.session().generate(STORY, interventions=[djinn.Capture("blocks.99.hook_resid_post")])
    finally:
        client.close()


def test_remote_generate_is_one_request_with_the_streams_result(stories_path, monkeypatch):
    with running_server(stories_path) as srv:
        client = djinn.connect(srv.url)
        ref = streamed(client.session(), **params())
        monkeypatch.setattr(RemoteBackend, "_events", no_stream)
        assert_same(client.session().generate(STORY, **params()), ref)
        monkeypatch.undo()
        # with breakpoints generate() streams, resuming every pause unchanged
        bp = client.session().generate(STORY, breakpoints=[djinn.Breakpoint(SITE, steps=[0, 5])], **params())
        assert_same(bp, ref)
        client.close()


class Interrupted(Exception):
    pass


def test_an_interrupted_embedded_generate_ends_its_request_and_keeps_the_session(stories_path):
    client = djinn.connect(model=str(stories_path))

    def interrupt(signum, frame):
        raise Interrupted()

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        s = client.session()
        s.generate(STORY, max_new_tokens=4)
        before = s.info()["n_tokens"]
        signal.setitimer(signal.ITIMER_REAL, 0.02)
        with pytest.raises(Interrupted):
            s.generate(" and", max_new_tokens=480, stop_tokens=[])  # far longer than 20 ms on the CPU
        info = s.info()  # the engine thread ran the cancel before this call (its queue is in order)
        assert info["state"] == "idle"
        assert info["n_tokens"] < before + 480  # cut short
        assert len(s.generate(" The", max_new_tokens=3).token_ids) == 3  # the session goes on
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        client.close()

"""The clients' two timeouts over a real server behind a loopback relay that holds back the server's first
reply on each connection: `connect_timeout` bounds only the TCP connect; a socket's opening (the upgrade
request) waits for its reply as long as a REST call does (`timeout`)."""
from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

import djinn
from djinn.client.aio import connect_async

from serverutil import running_server

SITE = "blocks.2.hook_resid_post"


class SlowRelay:
    """Forwards loopback TCP to `port`; the first bytes the server sends on each connection arrive `delay` s
    late (as from a server busy for that long)."""

    def __init__(self, port: int, delay: float):
        self.port_to, self.delay = port, delay
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.port_to))
            self._open += [client, server]
            threading.Thread(target=self._pipe, args=(client, server, 0.0), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, self.delay), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, first_delay: float) -> None:
        try:
            while data := src.recv(1 << 16):
                time.sleep(first_delay)
                first_delay = 0.0
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()
        for s in self._open:
            s.close()


@pytest.fixture(scope="module")
def slow_server(stories_path):
    with running_server(stories_path) as srv:
        relay = SlowRelay(srv.port, delay=0.8)
        try:
            yield relay
        finally:
            relay.close()


def test_a_slow_opening_waits_for_timeout_not_connect_timeout(slow_server):
    client = djinn.connect(slow_server.url, timeout=30, connect_timeout=0.2)
    s = client.session()
    t0 = time.monotonic()
    stream = s.stream("Once upon a time", max_new_tokens=2, breakpoints=[djinn.Breakpoint(SITE, steps=[0])])
    ev = next(stream)
    assert isinstance(ev, djinn.Paused) and time.monotonic() - t0 >= 0.8  # the relay did hold it back
    ev.resume()
    assert isinstance(list(stream)[-1], djinn.Done)
    client.close()


def test_an_opening_slower_than_timeout_is_a_typed_error(slow_server):
    client = djinn.connect(slow_server.url, timeout=30, connect_timeout=0.2)
    s = client.session()
    client._backend.timeout = 0.3  # the REST calls above had their replies; now only the opening is slow
    with pytest.raises(djinn.DjinnError, match="cannot open a stream.*handshake"):
        next(s.stream("Once upon a time", max_new_tokens=2))
    client._backend.timeout = 30
    assert s.info()["state"] != "paused"  # nothing was sent: the session is as it was
    client.close()


def test_the_async_client_opens_a_slow_socket_too(slow_server):
    async def run() -> None:
        client = await connect_async(slow_server.url, timeout=30, connect_timeout=0.2)
        try:
            s = await client.session()
            got = [ev async for ev in s.stream("Once upon a time", max_new_tokens=2)]
            assert isinstance(got[-1], djinn.Done)
        finally:
            await client.close()

    asyncio.run(run())

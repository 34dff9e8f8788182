"""The hand-off of engine events into the server's event loop: in order, on the loop's thread, one wake-up
for a burst, and nothing raised into the engine thread."""
from __future__ import annotations

import asyncio
import threading

from djinn.server.inbox import LoopInbox


def running_loop():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    return loop, thread


def stop(loop, thread) -> None:
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def test_events_run_on_the_loop_in_order_with_one_wake_up_a_burst():
    loop, thread = running_loop()
    wake_ups = []
    schedule = loop.call_soon_threadsafe
    loop.call_soon_threadsafe = lambda fn, *a: (wake_ups.append(fn), schedule(fn, *a))
    try:
        inbox = LoopInbox(loop)
        seen, threads_seen, done = [], set(), threading.Event()
        gate = threading.Event()
        schedule(gate.wait)  # the loop is busy while the burst arrives

        def on_event(ev):
            seen.append(ev)
            threads_seen.add(threading.current_thread())
            if ev == 999:
                done.set()

        for i in range(1000):
            inbox.put(on_event, i)
        gate.set()
        assert done.wait(5)
        assert seen == list(range(1000)) and threads_seen == {thread}
        assert len(wake_ups) == 1
        # after a drain the next event wakes the loop again
        again = threading.Event()
        inbox.put(lambda ev: again.set(), None)
        assert again.wait(5) and len(wake_ups) == 2
    finally:
        stop(loop, thread)


def test_producers_on_several_threads_keep_each_ones_order():
    loop, thread = running_loop()
    try:
        inbox = LoopInbox(loop)
        seen: dict[int, list[int]] = {p: [] for p in range(4)}
        done = threading.Event()
        total = [0]

        def on_event(ev):
            p, i = ev
            seen[p].append(i)
            total[0] += 1
            if total[0] == 4 * 500:
                done.set()

        producers = [threading.Thread(target=lambda p=p: [inbox.put(on_event, (p, i)) for i in range(500)])
                     for p in range(4)]
        for t in producers:
            t.start()
        for t in producers:
            t.join()
        assert done.wait(5)
        assert all(v == list(range(500)) for v in seen.values())
    finally:
        stop(loop, thread)


def test_a_failing_callback_drops_nothing_else_and_a_closed_loop_raises_nothing(caplog):
    loop, thread = running_loop()
    inbox = LoopInbox(loop)
    got, done = [], threading.Event()

    def bad(ev):
        raise ValueError("a stream's bug")

    inbox.put(bad, 0)
    inbox.put(lambda ev: (got.append(ev), done.set()), 1)
    assert done.wait(5) and got == [1]
    assert "event callback failed" in caplog.text
    stop(loop, thread)
    LoopInbox(loop).put(got.append, 2)  # the engine thread after the server stopped: dropped, no error
    assert got == [1]

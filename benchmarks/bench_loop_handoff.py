"""The engine thread handing a step's events for N sessions to the server's event loop (running in another
thread, as under uvicorn): `loop.call_soon_threadsafe` once per event against `djinn.server.inbox.LoopInbox`,
taking turns. Prints the medians of the time the engine thread spends handing the burst over and of the time
until the loop has run every callback, in microseconds. Host-only: no GPU involved."""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from djinn.server.inbox import LoopInbox  # noqa: E402


def burst_times(hand_over, n: int, bursts: int) -> tuple[float, float]:
    """(engine thread's time, time until all ran) per burst of `n` events, medians in us."""
    done, count = threading.Event(), [0]

    def on_event(ev: object) -> None:
        count[0] += 1
        if count[0] == n:
            done.set()

    handing, until_ran = [], []
    for _ in range(bursts):
        count[0] = 0
        done.clear()
        t0 = time.perf_counter()
        for i in range(n):
            hand_over(on_event, i)
        t1 = time.perf_counter()
        done.wait()
        t2 = time.perf_counter()
        handing.append((t1 - t0) * 1e6)
        until_ran.append((t2 - t0) * 1e6)
        time.sleep(0.001)  # the GPU's share of a step: the loop goes idle between bursts, as when serving
    return statistics.median(handing), statistics.median(until_ran)


def main(sessions: list[int], bursts: int, rounds: int) -> None:
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    inbox = LoopInbox(loop)
    variants = {"call_soon_threadsafe": loop.call_soon_threadsafe, "LoopInbox": inbox.put}
    print(f"{bursts} bursts a round, {rounds} rounds taking turns; medians over rounds, us")
    for n in sessions:
        got: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
        for _ in range(rounds):
            for name, hand_over in variants.items():
                got[name].append(burst_times(hand_over, n, bursts))
        for name, xs in got.items():
            handing = statistics.median(x for x, _ in xs)
            ran = statistics.median(y for _, y in xs)
            print(f"{n:4d} events  {name:22s} engine thread {handing:8.1f}   all run {ran:8.1f}", flush=True)
    loop.call_soon_threadsafe(loop.stop)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sessions", default="1,8,64,128")
    ap.add_argument("--bursts", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    main([int(x) for x in a.sessions.split(",")], a.bursts, a.rounds)

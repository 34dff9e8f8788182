"""Where a `checkpoint()` over the control socket spends its time, hop by hop: a server in its own process
stamps the control call as the event loop starts it, the engine thread's drain and `Engine.checkpoint`,
and the call's end; the client stamps its call and the reply (`time.perf_counter` is the system's monotonic
clock, so the two processes' stamps compare). Four situations, taking turns: back to back, right after a
32-token WebSocket stream (as the seed experiment calls it), 2 ms after one, and after 50 ms idle.

    python3 benchmarks/profile_control.py                # GPT-2-small shape, float16, on the GPU
    python3 benchmarks/profile_control.py --device cpu   # the same widths, 2 layers, on the CPU
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import djinn  # noqa: E402
from benchmarks.engine_stamps import STAMPS, dump_on_sigterm, load, served  # noqa: E402
from benchmarks.profile_wire import model  # noqa: E402

HOPS = ("client -> loop", "loop -> engine thread", "drain", "Engine.checkpoint", "engine -> loop",
        "loop -> client", "total")


def serve(device: str, port: int, stamps_path: str) -> None:
    """The server, with the checkpoint call's hops stamped; the stamps go to `stamps_path` on SIGTERM."""
    from djinn.engine import engine as engine_mod
    from djinn.server import state as state_mod
    from djinn.server.launch import run

    def stamped(name: str, fn):
        def wrapper(*args, **kwargs):
            STAMPS.append((name + "_start", time.perf_counter()))
            try:
                return fn(*args, **kwargs)
            finally:
                STAMPS.append((name + "_end", time.perf_counter()))
        return wrapper

    run_call = state_mod.ServerState.run_call

    async def control_call(self, owner, call, args):
        if call.name != "checkpoint":
            return await run_call(self, owner, call, args)
        STAMPS.append(("call_start", time.perf_counter()))
        try:
            return await run_call(self, owner, call, args)
        finally:
            STAMPS.append(("call_end", time.perf_counter()))

    engine_mod.Engine.checkpoint = stamped("engine", engine_mod.Engine.checkpoint)
    engine_mod.Engine.drain = stamped("drain", engine_mod.Engine.drain)
    state_mod.ServerState.run_call = control_call  # what the control socket runs a call with
    dump_on_sigterm(stamps_path)
    loaded, _ = model(device)
    run([loaded], port=port, api_keys=[], kv_memory=2 << 30, log_level="warning")


def hops(server: list[tuple[str, float]], sent: float, got: float) -> list[float]:
    """One call's hops in ms: each server stamp is the first of its kind after the client sent the call."""
    first = {}
    for name, t in server:
        if t >= sent and name not in first:
            first[name] = t
    marks = [sent, first["call_start"], first["drain_start"], first["engine_start"], first["engine_end"],
             first["call_end"], got]
    return [(b - a) * 1000 for a, b in zip(marks, marks[1:])] + [(got - sent) * 1000]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--stamps", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        return serve(args.device, args.port, args.stamps)
    stamps_path = os.path.join(tempfile.mkdtemp(), "server_stamps.json")
    calls: list[tuple[str, float, float]] = []
    with served([os.path.abspath(__file__), "--serve", "--device", args.device, "--stamps", stamps_path]) as url:
        client = djinn.connect(url)
        prompt = list(range(1, 64))
        state = {"session": client.session()}
        state["session"].generate(prompt, max_new_tokens=1, stop_tokens=[])

        def stream() -> None:  # a fresh session each time, so that no context fills up
            state["session"].close()
            state["session"] = client.session()
            for _ in state["session"].stream(prompt, max_new_tokens=32, stop_tokens=[]):
                pass
        situations = {"back to back": lambda: None, "after a stream": stream,
                      "2 ms after a stream": lambda: (stream(), time.sleep(0.002)),
                      "after 50 ms idle": lambda: time.sleep(0.05)}
        for trial in range(args.trials + 2):  # two warm-up rounds
            for name, before in situations.items():
                before()
                sent = time.perf_counter()
                ck = state["session"].checkpoint()
                got = time.perf_counter()
                ck.delete()  # within the server's per-key checkpoint limit
                if trial >= 2:
                    calls.append((name, sent, got))
        client.close()
    server = load(stamps_path)
    where = torch.cuda.get_device_name() if args.device != "cpu" else "cpu"
    print(f"checkpoint() over the control socket, GPT-2 widths (float16) on {where}, sessions of 63-95 tokens, "
          f"{args.trials} trials per situation; medians in ms per hop:")
    print(f"  {'':22s}" + "".join(f"{h:>22s}" for h in HOPS))
    for name in situations:
        rows = [hops(server, sent, got) for n, sent, got in calls if n == name]
        print(f"  {name:22s}" + "".join(f"{statistics.median(col):22.3f}" for col in zip(*rows)))


if __name__ == "__main__":
    main()

"""Many sessions, one client thread each (bench.py's throughput part): tokens/s with the thread queues that carry
events and engine commands as `queue.Queue` (a Python-level lock and condition) or `queue.SimpleQueue` (the
engine's choice: one C call a put); with each thread calling `generate()` instead of reading the stream (the
tokens stay on the engine thread, the thread wakes once); and with no client threads at all (events to sinks
on the engine thread). The variants take turns on one engine, each run with an engine thread of its own. On the CPU it runs a tiny random model (the
host's share of a step, as ratios); on the GPU the Mistral-7B shape. Prints tokens/s per variant and trial,
then medians."""
from __future__ import annotations

import argparse
import functools
import os
import queue
import statistics
import sys
import time
import types

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import djinn.client.embedded as embedded  # noqa: E402
import djinn.engine.service as service  # noqa: E402
from benchmarks import bench  # noqa: E402
from djinn.client import Client  # noqa: E402
from djinn.client.embedded import EmbeddedBackend  # noqa: E402
from djinn.engine.engine import Engine  # noqa: E402
from djinn.models.config import ModelConfig  # noqa: E402
from djinn.models.loading import load_random  # noqa: E402

# small enough that a CPU step is mostly the host's work, as a GPU step's host side is
TINY = ModelConfig(family="llama", vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=128,
                   max_seq_len=512)


def with_queue(cls) -> None:
    """The engine thread's command queue and the embedded client's event queues, as `cls`."""
    ns = types.SimpleNamespace(SimpleQueue=cls, Empty=queue.Empty)
    service.queue = embedded.queue = ns


def generate_tokens(session, prompt: list[int], n_new: int, items: list, bps: list) -> int:
    """One session's call through generate() (no breakpoints: the plain mode): the tokens it returned."""
    assert not bps
    return len(session.generate(prompt, max_new_tokens=n_new, stop_tokens=[], interventions=items).token_ids)


def main(device: str, n_sessions: int, trials: int) -> None:
    dev = torch.device(device)
    if dev.type == "cuda":
        spec = bench.SHAPES["mistral"]
        loaded = load_random(spec["cfg"], spec["dtype"], dev, seed=0, name="mistral-7b-random")
        n_prompt, n_new, options = 128, 256, dict(kv_memory=8 << 30)
    else:
        bench.now = time.perf_counter  # nothing to synchronize
        loaded = load_random(TINY, torch.float32, dev, seed=0, name="tiny-random")
        n_prompt, n_new, options = 16, 64, {}
    variants = {
        "client threads, queue.Queue": (queue.Queue, bench.throughput),
        "client threads, queue.SimpleQueue": (queue.SimpleQueue, bench.throughput),
        "client threads calling generate()": (queue.SimpleQueue, functools.partial(bench.throughput,
                                                                                    run=generate_tokens)),
        "engine sinks, queue.SimpleQueue": (queue.SimpleQueue, bench.throughput_engine_sinks),
    }
    # one engine for every run, so its graphs, once captured in the warm-up round, serve all variants alike;
    # each run has an engine thread of its own (the command queue is made with it) and event queues
    engine = Engine([loaded], **options)
    rates: dict[str, list[float]] = {v: [] for v in variants}
    for trial in range(trials + 1):  # the first round warms up (graphs, allocator) and is not counted
        for name, (cls, measure) in variants.items():
            with_queue(cls)
            client = Client(EmbeddedBackend(engine))
            try:
                tps = measure(client, n_sessions, "plain", n_prompt=n_prompt, n_new=n_new)[0]
            finally:
                client.close()  # stops this run's engine thread; the engine stays
            if trial:
                rates[name].append(tps)
                print(f"trial {trial}  {name:36s} {tps:9.0f} tokens/s", flush=True)
    base = statistics.median(rates["client threads, queue.Queue"])
    print(f"\n{device}, {n_sessions} sessions, {n_prompt}-token prompts, {n_new} new tokens; medians of {trials}")
    for name, xs in rates.items():
        m = statistics.median(xs)
        print(f"{name:36s} {m:9.0f} tokens/s  {m / base:5.3f}x")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sessions", type=int, default=64)
    ap.add_argument("--trials", type=int, default=5)
    a = ap.parse_args()
    main(a.device, a.sessions, a.trials)

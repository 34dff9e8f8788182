"""One decoding session (GPT-2-small shape on the GPU), ms/token through each path that can drive it, in one
process: the engine stepped directly (no engine thread), `Session.generate()` (one reply), `Session.stream()`
(an event a token), and `generate()` on an engine with the benchmark's larger KV pool. bench.py's batch-1
figure is `generate()`'s; the step driven directly is the GPU's and the graph's share. Variants take turns,
each round on fresh engines. On the CPU it runs a tiny random model (the host's share only). Prints ms/token
per variant and round, then medians."""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import djinn  # noqa: E402
from benchmarks import bench  # noqa: E402
from benchmarks.experiment_one_token import step_ms  # noqa: E402
from djinn.models.config import ModelConfig  # noqa: E402
from djinn.models.loading import load_random  # noqa: E402

TINY = ModelConfig(family="gpt2", vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, d_mlp=256,
                   max_seq_len=1024, tie_embeddings=True)


def stream_tokens(session, prompt: list[int], n: int) -> None:
    for _ in session.stream(prompt, max_new_tokens=n, stop_tokens=[]):
        pass


def through_client(run: Callable, trials: int = 1) -> Callable[[object, int, int], float]:
    """bench.py's batch-1 figure for `run(session, prompt, n)`, on a fresh embedded client."""
    def measure(loaded, kv_memory: int, n_new: int) -> float:
        client = djinn.connect(model=loaded, kv_memory=kv_memory)
        bench.batch1_ms_per_token(client, n_new=8, trials=1, run=run)  # warm-up
        ms = bench.batch1_ms_per_token(client, n_new=n_new, trials=trials, run=run)
        client.close()
        return ms
    return measure


def main(device: str, rounds: int, n_new: int) -> None:
    dev = torch.device(device)
    if dev.type == "cuda":
        spec = bench.SHAPES["gpt2"]
        loaded = load_random(spec["cfg"], spec["dtype"], dev, seed=0, name="gpt2-small-random")
        small, large = 2 << 30, 16 << 30  # the smoke test's KV pool, bench.py's
    else:
        bench.now = time.perf_counter  # nothing to synchronize
        loaded = load_random(TINY, torch.float32, dev, seed=0, name="tiny-random")
        small, large = 64 << 20, 512 << 20
    variants = {
        "engine.step() driven directly": (step_ms, small),
        "generate()": (through_client(bench.generate_tokens), small),
        "stream()": (through_client(stream_tokens), small),
        f"generate(), {large >> 20} MiB KV pool": (through_client(bench.generate_tokens), large),
    }
    results: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):
        for name, (measure, kv_memory) in variants.items():
            results[name].append(measure(loaded, kv_memory, n_new))
            print(f"round {r + 1}  {name:<40} {results[name][-1]:.3f} ms/token", flush=True)
    print(f"\n{device}, one session, 16-token prompt, {n_new} new tokens; medians of {rounds}")
    for name, values in results.items():
        print(f"{name:<40} {statistics.median(values):.3f} ms/token")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=256)
    args = ap.parse_args()
    main(args.device, args.rounds, args.tokens)

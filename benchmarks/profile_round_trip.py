"""Where a breakpoint round trip spends its time, embedded: a 512-token prefill paused at a layer and resumed
unchanged at once, with host timestamps at each hand-off (engine thread and client thread).

    python3 benchmarks/profile_round_trip.py                 # GPT-2-small shape, float16, on the GPU
    python3 benchmarks/profile_round_trip.py --device cpu    # a small GPT-2 shape on the CPU

Prints the median time of each stage over the trials, from the moment the runner returns with the row
paused, and the added time of the whole round trip against an uninterrupted prefill measured alongside.
The stamps wrap the engine's methods from outside; nothing in the engine changes for this.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import djinn  # noqa: E402
from djinn.engine import engine as engine_mod, runner as runner_mod, worker as worker_mod  # noqa: E402
from djinn.models.config import ModelConfig  # noqa: E402
from djinn.models.loading import load_random  # noqa: E402

STAMPS: list[tuple[str, float]] = []


def stamp(name: str) -> None:
    STAMPS.append((name, time.perf_counter()))


def wrap(owner, name: str, label: str) -> None:
    inner = getattr(owner, name)

    def wrapped(*args, **kwargs):
        stamp(label + " >")
        out = inner(*args, **kwargs)
        stamp(label + " <")
        return out
    setattr(owner, name, wrapped)


def instrument() -> None:
    wrap(runner_mod.Runner, "run", "runner.run")
    wrap(engine_mod.Engine, "resume", "engine.resume")
    wrap(worker_mod.ModelWorker, "_schedule", "schedule")
    wrap(worker_mod.ModelWorker, "drain", "drain")
    emit = worker_mod._emit

    def emit_stamped(req, event):
        stamp(f"emit {type(event).__name__}")
        emit(req, event)
    worker_mod._emit = emit_stamped


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--trials", type=int, default=15)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        cfg, dtype = ModelConfig(family="gpt2", vocab_size=50257, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
                                 d_mlp=3072, max_seq_len=1024, tie_embeddings=True), torch.float16
    else:
        cfg, dtype = ModelConfig(family="gpt2", vocab_size=512, d_model=64, n_layers=12, n_heads=4, n_kv_heads=4,
                                 d_mlp=256, max_seq_len=1024, tie_embeddings=True), torch.float32
    client = djinn.connect(model=load_random(cfg, dtype, device, name="gpt2-shape"), kv_memory=2 << 30)
    prompt = torch.randint(0, cfg.vocab_size, (512,), generator=torch.Generator().manual_seed(1)).tolist()
    bps = [djinn.Breakpoint(f"blocks.{args.layer}.hook_resid_post", steps=[0])]
    instrument()
    stages, added = defaultdict(list), []
    for trial in range(args.trials + 2):  # two warm-ups
        plain, paused = client.session(), client.session()
        sync(device)
        t0 = time.perf_counter()
        plain.generate(prompt, max_new_tokens=1, stop_tokens=[])
        sync(device)
        t1 = time.perf_counter()
        STAMPS.clear()
        for ev in paused.stream(prompt, max_new_tokens=1, breakpoints=bps, stop_tokens=[]):
            stamp(f"client has {type(ev).__name__}")
            if isinstance(ev, djinn.Paused):
                ev.resume()
                stamp("client's resume() returned")
        sync(device)
        t2 = time.perf_counter()
        plain.close()
        paused.close()
        if trial < 2:
            continue
        added.append(((t2 - t1) - (t1 - t0)) * 1000)
        names = [n for n, _ in STAMPS]
        origin = STAMPS[names.index("runner.run <")][1]  # the first half is launched, the row paused
        seen = set()
        for n, t in STAMPS:
            key = n if n not in seen else n + " (again)"
            while key in seen:
                key += "'"
            seen.add(key)
            stages[key].append((t - origin) * 1000)
    print(f"{client.models()[0].name} on {device}: 512-token prefill paused at blocks.{args.layer}.hook_resid_post, "
          f"{args.trials} trials")
    order = sorted(stages, key=lambda k: statistics.median(stages[k]))
    for k in order:
        print(f"  {statistics.median(stages[k]):8.3f} ms  {k}")
    print(f"round trip added over an uninterrupted prefill (median): {statistics.median(added):.3f} ms")
    client.close()


if __name__ == "__main__":
    main()

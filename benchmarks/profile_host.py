"""Host time per engine step, by phase, with many decode rows: what the engine thread spends scheduling,
planning the graphs' step, packing its inputs, reading tokens and launching sampling, on a model so small
that its compute hardly counts. On a GPU this host work overlaps the step before; it sets the pace once it
exceeds the GPU's time per step.

    python3 benchmarks/profile_host.py --device cpu --rows 128     # the graphs' path, nothing captured
    python3 benchmarks/profile_host.py --rows 128                  # on the GPU, graphs captured

Each run: `rows` sessions, 16-token prompts, 48 new tokens each, driven through `Engine.step()`; medians over
7 runs of each phase's host time per step (wrapped from outside).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from djinn.engine import cuda_graphs as graphs_mod, runner as runner_mod, scheduler as scheduler_mod  # noqa: E402
from djinn.engine import worker as worker_mod  # noqa: E402
from djinn.engine.engine import Engine  # noqa: E402
from djinn.models.config import ModelConfig  # noqa: E402
from djinn.models.loading import load_random  # noqa: E402

PHASES = [(scheduler_mod.Scheduler, "schedule"), (runner_mod, "plan_step"),
          (graphs_mod.StepGraphs, "_load_inputs"), (worker_mod.ModelWorker, "drain"),
          (worker_mod.ModelWorker, "_launch_sampling")]
SPENT: dict[str, float] = {}


def wrap(owner, name: str) -> None:
    inner = getattr(owner, name)

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            SPENT[name] = SPENT.get(name, 0.0) + time.perf_counter() - t
    setattr(owner, name, timed)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rows", type=int, default=128)
    args = ap.parse_args()
    for owner, name in PHASES:
        wrap(owner, name)
    cfg = ModelConfig(family="llama", vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=64,
                      max_seq_len=512)
    engine = Engine([load_random(cfg, torch.float32, torch.device(args.device), name="tiny")], kv_blocks=4096,
                    cuda_graphs=True)

    def run() -> int:
        sids = [engine.create_session("me") for _ in range(args.rows)]
        for i, sid in enumerate(sids):
            engine.generate(sid, "me", [1 + i % 200] * 16, lambda ev: None, max_new_tokens=48, stop_tokens=[])
        steps = 0
        while engine.has_work():
            engine.step()
            steps += 1
        for sid in sids:
            engine.close_session(sid, "me")
        return steps
    run()  # warm-up (graphs captured on a GPU)
    per_step: dict[str, list[float]] = {}
    for _ in range(7):
        SPENT.clear()
        t = time.perf_counter()
        steps = run()
        SPENT["whole step"] = time.perf_counter() - t
        for k, v in SPENT.items():
            per_step.setdefault(k, []).append(v * 1000 / steps)
    print(f"{args.rows} rows on {args.device}: host ms per step (medians of 7 runs of {steps} steps)")
    for k, v in per_step.items():
        print(f"  {k:18s} {statistics.median(v):.3f}")


if __name__ == "__main__":
    main()

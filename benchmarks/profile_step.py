"""Where a decode step's time goes: Mistral-7B shape, N sessions decoding together, the engine driven
directly (no client threads), with and without the PyTorch profiler. Prints the top CUDA kernels."""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.bench import SHAPES  # noqa: E402
from djinn.engine.engine import Engine  # noqa: E402
from djinn.models.loading import load_random  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=64)
    ap.add_argument("--shape", default="mistral")
    args = ap.parse_args()
    spec = SHAPES[args.shape]
    loaded = load_random(spec["cfg"], spec["dtype"], torch.device("cuda"), seed=0, name="m")
    engine = Engine([loaded], kv_memory=20 << 30)
    events = []
    g = torch.Generator().manual_seed(0)
    for _ in range(args.sessions):
        sid = engine.create_session("bench")
        engine.generate(sid, "bench", torch.randint(0, 32000, (128,), generator=g).tolist(), events.append,
                        max_new_tokens=200, stop_tokens=[])
    for _ in range(30):  # prefill and warm-up, graphs captured
        engine.step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    n = 40
    for _ in range(n):
        engine.step()
    torch.cuda.synchronize()
    step_ms = (time.perf_counter() - t) * 1000 / n
    print(f"sessions={args.sessions}: engine.step() driven directly: {step_ms:.2f} ms/step, "
          f"{args.sessions / step_ms * 1000:.0f} tokens/s")
    runner = engine.workers["m"].runner
    replay = next(iter(runner.graphs._graphs.values()))  # the whole forward at this batch size
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(20):
        replay()
    e.record()
    e.synchronize()
    print(f"graph replay alone: {s.elapsed_time(e) / 20:.2f} ms")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            engine.step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()

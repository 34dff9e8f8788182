"""Where a prefill step's time goes: one session's N-token prompt through the engine, driven directly.
Prints host and GPU time of the step, the PyTorch profiler's top kernels and host calls, and any operation
that synchronises the host with the GPU inside the step (PyTorch's sync debug mode).

    python3 benchmarks/profile_prefill.py --shape gpt2 --tokens 512
"""
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
    ap.add_argument("--shape", default="gpt2")
    ap.add_argument("--tokens", type=int, default=512)
    args = ap.parse_args()
    spec = SHAPES[args.shape]
    loaded = load_random(spec["cfg"], spec["dtype"], torch.device("cuda"), seed=0, name="m")
    engine = Engine([loaded], kv_memory=4 << 30)
    prompt = torch.randint(0, spec["cfg"].vocab_size, (args.tokens,), generator=torch.Generator().manual_seed(0))

    def prefill() -> tuple[float, float]:
        sid = engine.create_session("bench")
        engine.generate(sid, "bench", prompt.tolist(), lambda ev: None, max_new_tokens=1, stop_tokens=[])
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t = time.perf_counter()
        start.record()
        engine.step()  # the prefill's forward and sampling, queued
        host = time.perf_counter() - t
        end.record()
        while engine.has_work():
            engine.step()
        torch.cuda.synchronize()
        engine.close_session(sid, "bench")
        return host * 1000, start.elapsed_time(end)

    for _ in range(3):
        prefill()
    runs = sorted(prefill() for _ in range(9))
    host_ms, gpu_ms = runs[4]
    print(f"{args.shape}, {args.tokens}-token prefill: step() returns after {host_ms:.2f} ms of host time; "
          f"GPU {gpu_ms:.2f} ms from its start to its last queued op (medians of 9)")
    torch.cuda.set_sync_debug_mode("warn")
    prefill()
    torch.cuda.set_sync_debug_mode(0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            prefill()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=20, max_name_column_width=60))


if __name__ == "__main__":
    main()

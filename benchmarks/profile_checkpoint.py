"""Where an embedded `checkpoint()` call's time goes: the caller's wall time, the engine's own `checkpoint`
(stamped on the engine thread), and a cProfile of the engine's checkpoints by function. GPT-2-small shape,
float16, a session of 512 + 128 tokens: right after a generation (as bench.py calls it), back to back, and
after 50 ms idle.

    python3 benchmarks/profile_checkpoint.py            # on the GPU
    python3 benchmarks/profile_checkpoint.py --device cpu
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import djinn  # noqa: E402
from djinn.engine.engine import Engine  # noqa: E402
from benchmarks.profile_wire import model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--trials", type=int, default=30)
    args = ap.parse_args()
    loaded, _ = model(args.device)
    profiler = cProfile.Profile()
    inside: list[float] = []
    plain = Engine.checkpoint

    def stamped(self, *a, **k):
        t = time.perf_counter()
        profiler.enable()
        try:
            return plain(self, *a, **k)
        finally:
            profiler.disable()
            inside.append((time.perf_counter() - t) * 1000)
    Engine.checkpoint = stamped
    client = djinn.connect(model=loaded, kv_memory=2 << 30)
    prompt = torch.randint(0, loaded.config.vocab_size, (512,), generator=torch.Generator().manual_seed(1)).tolist()
    results = {}
    for mode in ("after_generate", "back_to_back", "after_50ms_idle"):
        wall, inside[:] = [], []
        s = client.session()
        s.generate(prompt, max_new_tokens=128, stop_tokens=[])
        for _ in range(args.trials):
            if mode == "after_generate":
                s.generate([], max_new_tokens=1, stop_tokens=[])
            elif mode == "after_50ms_idle":  # as after a user's pause: the threads have gone to sleep
                time.sleep(0.05)
            t = time.perf_counter()
            ck = s.checkpoint()
            wall.append((time.perf_counter() - t) * 1000)
            ck.wait()
            ck.delete()
        s.close()
        results[mode] = (statistics.median(wall), statistics.median(inside))
    client.close()
    where = torch.cuda.get_device_name() if args.device != "cpu" else "cpu"
    print(f"{loaded.name} on {where}, 640-token session, {args.trials} checkpoints per mode, medians in ms:")
    print(f"  {'':16s} {'caller':>8s} {'engine.checkpoint':>18s} {'the rest (hand-offs)':>21s}")
    for mode, (w, i) in results.items():
        print(f"  {mode:16s} {w:8.3f} {i:18.3f} {w - i:21.3f}")
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(15)
    print("\nengine.checkpoint by function (all trials, cProfile, tottime first):")
    print(out.getvalue())


if __name__ == "__main__":
    main()

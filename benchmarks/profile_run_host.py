"""Host time per prompt of a harvesting run (`client.run_iter` capturing one site, forward only) on a model
so small that its forward hardly counts: what the engine and the client spend on each prompt (its session,
its request, its scheduling, its result), the part of a harvest that no faster kernel removes.

    python3 benchmarks/profile_run_host.py --device cpu           # the host alone
    python3 benchmarks/profile_run_host.py                        # on the GPU (graphs on, captures staged)

Each trial: 4,096 prompts of 16 random tokens, a window of 1,024, `blocks.0.hook_resid_post` captured;
the median of 5 trials after a warm-up trial. `--profile` prints the engine thread's cProfile instead.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import djinn  # noqa: E402
from djinn.client.api import Client  # noqa: E402
from djinn.client.embedded import EmbeddedBackend  # noqa: E402
from djinn.engine import service  # noqa: E402
from djinn.engine.engine import Engine  # noqa: E402
from djinn.models.config import ModelConfig  # noqa: E402
from djinn.models.loading import load_random  # noqa: E402

TINY = ModelConfig(family="gpt2", vocab_size=256, d_model=16, n_layers=2, n_heads=2, n_kv_heads=2, d_mlp=32,
                   max_seq_len=256)
SITE = "blocks.0.hook_resid_post"


def profiled_engine_thread() -> cProfile.Profile:
    prof, loop = cProfile.Profile(), service.EngineService._loop

    def profiled(self):
        prof.enable()
        try:
            loop(self)
        finally:
            prof.disable()

    service.EngineService._loop = profiled
    return prof


def trial(client: Client, prompts: torch.Tensor, window: int) -> tuple[float, float, float]:
    """Seconds of the trial: wall-clock, the engine thread's CPU time, the calling thread's CPU time."""
    engine = time.pthread_getcpuclockid(client._backend.service._thread.ident)
    t, e, c, n = time.perf_counter(), time.clock_gettime(engine), time.thread_time(), 0
    for out in client.run_iter((p.tolist() for p in prompts), window=window, interventions=[djinn.Capture(SITE)]):
        n += out.captures[(SITE, 0)].shape[0]
    elapsed = time.perf_counter() - t, time.clock_gettime(engine) - e, time.thread_time() - c
    assert n == prompts.numel()
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompts", type=int, default=4096)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "profile_run_host.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)  # the forward of so small a model gains nothing from threads
    prof = profiled_engine_thread() if args.profile else None
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    client = Client(EmbeddedBackend(Engine([load_random(TINY, dtype, device)], kv_blocks=4096)))
    prompts = torch.randint(0, TINY.vocab_size, (args.prompts, 16), generator=torch.Generator().manual_seed(0))
    window = 1024
    trial(client, prompts, window)  # warm-up: graphs, pinned buffers, caches
    trials = [trial(client, prompts, window) for _ in range(args.trials)]
    client.close()
    times, engine_cpu, caller_cpu = zip(*trials)
    per_prompt_us, engine_us, caller_us = (statistics.median(x) / args.prompts * 1e6
                                           for x in (times, engine_cpu, caller_cpu))
    print(f"{args.device}: {per_prompt_us:.1f} us a prompt; CPU time of the engine thread {engine_us:.1f} us, of the "
          f"caller {caller_us:.1f} us (medians of {args.trials} trials of {args.prompts})")
    if prof is not None:
        pstats.Stats(prof).sort_stats(os.environ.get("SORT", "tottime")).print_stats(int(os.environ.get("TOP", "40")))
        return
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "prompts": args.prompts,
              "tokens_per_prompt": 16, "window": window, "site": SITE, "trials_s": times,
              "host_us_per_prompt": per_prompt_us, "engine_thread_cpu_us_per_prompt": engine_us,
              "caller_thread_cpu_us_per_prompt": caller_us}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

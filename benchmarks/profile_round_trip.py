"""Where a breakpoint round trip spends its time, embedded: a 512-token prefill paused at a layer and resumed
unchanged at once, with host timestamps at each hand-off (engine thread and client thread).

    python3 benchmarks/profile_round_trip.py                 # GPT-2-small shape, float16, on the GPU
    python3 benchmarks/profile_round_trip.py --device cpu    # a small GPT-2 shape on the CPU

Prints the stamps of the trial whose added time is the median, in order, from the moment the runner returns
with the row paused; on a GPU also when the GPU reached the start and end of each runner call (CUDA events
recorded there, so an idle GPU shows as a gap); and the median added time of the whole round trip against
an uninterrupted prefill measured alongside. The stamps wrap the engine's methods from outside; nothing in
the engine changes for this.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import djinn  # noqa: E402
from djinn.engine import cuda_graphs as graphs_mod, engine as engine_mod, runner as runner_mod  # noqa: E402
from djinn.engine import scheduler as scheduler_mod, staging as staging_mod, worker as worker_mod  # noqa: E402
from djinn.models.config import ModelConfig  # noqa: E402
from djinn.models.loading import load_random  # noqa: E402

STAMPS: list[tuple[str, float]] = []
GPU_MARKS: list[tuple[str, object]] = []


def stamp(name: str) -> None:
    STAMPS.append((name, time.perf_counter()))


def gpu_mark(name: str) -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        GPU_MARKS.append((name, e))


def wrap(owner, name: str, label: str, on_gpu: bool = False) -> None:
    inner = getattr(owner, name)

    def wrapped(*args, **kwargs):
        stamp(label + " >")
        if on_gpu:
            gpu_mark(label + " >")
        out = inner(*args, **kwargs)
        if on_gpu:
            gpu_mark(label + " <")
        stamp(label + " <")
        return out
    setattr(owner, name, wrapped)


def instrument() -> None:
    wrap(runner_mod.Runner, "run", "runner.run", on_gpu=True)
    wrap(engine_mod.Engine, "resume", "engine.resume")
    wrap(scheduler_mod.Scheduler, "schedule", "schedule")
    wrap(worker_mod.ModelWorker, "drain", "drain")
    wrap(worker_mod.ModelWorker, "_settle", "settle")
    wrap(worker_mod.ModelWorker, "_launch_sampling", "launch sampling")
    wrap(runner_mod, "plan_step", "plan_step")
    wrap(graphs_mod.StepGraphs, "_load_inputs", "graphs.load_inputs")
    wrap(graphs_mod.StepGraphs, "_at_cut", "graphs.at_cut")
    wrap(staging_mod.HostStager, "stage", "stage")
    if torch.cuda.is_available():
        wrap(torch.cuda.CUDAGraph, "replay", "graph replay")
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
    trials = []
    for trial in range(args.trials + 2):  # two warm-ups
        plain, paused = client.session(), client.session()
        sync(device)
        t0 = time.perf_counter()
        plain.generate(prompt, max_new_tokens=1, stop_tokens=[])
        sync(device)
        t1 = time.perf_counter()
        STAMPS.clear()
        GPU_MARKS.clear()
        for ev in paused.stream(prompt, max_new_tokens=1, breakpoints=bps, stop_tokens=[]):
            stamp(f"client has {type(ev).__name__}")
            if isinstance(ev, djinn.Paused):
                ev.resume()
                stamp("client's resume() returned")
        sync(device)
        t2 = time.perf_counter()
        plain.close()
        paused.close()
        if trial >= 2:
            gpu = [(n, GPU_MARKS[0][1].elapsed_time(e)) for n, e in GPU_MARKS] if GPU_MARKS else []
            trials.append((((t2 - t1) - (t1 - t0)) * 1000, list(STAMPS), gpu))
    print(f"{client.models()[0].name} on {device}: 512-token prefill paused at blocks.{args.layer}.hook_resid_post, "
          f"{args.trials} trials")
    trials.sort(key=lambda x: x[0])
    added, stamps, gpu = trials[len(trials) // 2]
    origin = next(t for n, t in stamps if n == "runner.run <")  # the first half is launched, the row paused
    print(f"host, the median trial (added {added:.3f} ms), ms from the paused runner call's return:")
    for n, t in stamps:
        print(f"  {(t - origin) * 1000:8.3f}  {n}")
    if gpu:
        print("GPU, the same trial, ms from the first runner call's start as the GPU reached it:")
        for n, t in gpu:
            print(f"  {t:8.3f}  {n}")
    print(f"round trip added over an uninterrupted prefill (median): {statistics.median(x[0] for x in trials):.3f} ms")
    client.close()


if __name__ == "__main__":
    main()

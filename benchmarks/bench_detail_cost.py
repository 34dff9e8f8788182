"""What the white-box sites cost the rows that do not ask for them, on one GPU.

64 sessions decode together (128-token random prompts) on the GPT-2-small shape (float16) and the Mistral-7B
shape (bfloat16). Three cases, alternated over rounds on one engine per shape, each timing `engine.step()`
over 40 decode steps after warm-up:

- nobody: no session reads anything inside an op;
- pattern: one session captures every layer's attention pattern at every step (the decode steps stay in
  the CUDA graphs: the attention kernel keeps that row's scores);
- neurons: one session captures every layer's MLP neurons (`mlp.hook_post`) at every step (those steps run
  eagerly): for comparison.

The other 63 sessions' tokens/s in a case is 63 tokens a step over its step time, so their ratio to nobody's
is the inverse ratio of step times. Prints each measurement, the medians and the ratios; writes JSON to
$OUT/bench_detail_cost.json.

    python benchmarks/bench_detail_cost.py [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import djinn  # noqa: E402
from benchmarks import bench  # noqa: E402
from djinn.engine.engine import Engine  # noqa: E402
from djinn.models.loading import load_random  # noqa: E402

SESSIONS, PROMPT, WARMUP, TIMED = 64, 128, 30, 40
CASES = {"nobody": [], "pattern": [djinn.Capture("blocks.*.attn.hook_pattern")],
         "neurons": [djinn.Capture("blocks.*.mlp.hook_post")]}


def step_ms(engine: Engine, name: str, reader: list) -> float:
    """The mean step time of 64 sessions decoding, the first of them with `reader`'s interventions."""
    g = torch.Generator().manual_seed(0)
    sids = []
    for i in range(SESSIONS):
        sid = engine.create_session("owner")
        engine.generate(sid, "owner", torch.randint(0, engine.workers[name].cfg.vocab_size, (PROMPT,),
                                                     generator=g).tolist(),
                        lambda ev: None, max_new_tokens=WARMUP + TIMED + 20, stop_tokens=[],
                        interventions=reader if i == 0 else [])
        sids.append(sid)
    for _ in range(WARMUP):  # the prompts, then decode steps: graphs recorded
        engine.step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(TIMED):
        engine.step()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t) * 1000 / TIMED
    for sid in sids:
        engine.close_session(sid, "owner")
    engine.step()
    return ms


def main(rounds: int) -> None:
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "sessions": SESSIONS,
              "prompt_tokens": PROMPT, "timed_steps": TIMED, "rounds": rounds, "shapes": {}}
    for shape in ("gpt2", "mistral"):
        spec = bench.SHAPES[shape]
        loaded = load_random(spec["cfg"], spec["dtype"], torch.device("cuda"), seed=0, name=shape)
        engine = Engine([loaded], kv_memory=8 << 30)
        times: dict[str, list[float]] = {c: [] for c in CASES}
        for r in range(rounds):
            order = list(CASES) if r % 2 == 0 else list(reversed(CASES))
            for case in order:
                times[case].append(step_ms(engine, shape, CASES[case]))
                print(f"{shape} round {r + 1} {case:<8} {times[case][-1]:.3f} ms/step", flush=True)
        med = {c: statistics.median(v) for c, v in times.items()}
        others = {c: (SESSIONS - 1) * 1000 / med[c] for c in CASES}
        report["shapes"][shape] = {
            "step_ms": times, "median_step_ms": med, "other_sessions_tokens_per_s": others,
            "others_tokens_per_s_ratio_to_nobody": {c: others[c] / others["nobody"] for c in CASES}}
        print(f"{shape}: medians " + ", ".join(f"{c} {med[c]:.3f} ms" for c in CASES) + "; the other 63's tokens/s "
              + ", ".join(f"{c} {others[c] / others['nobody']:.3f}x" for c in CASES), flush=True)
        del engine, loaded
        torch.cuda.empty_cache()
    with open(os.path.join(os.environ.get("OUT", "."), "bench_detail_cost.json"), "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    main(ap.parse_args().rounds)

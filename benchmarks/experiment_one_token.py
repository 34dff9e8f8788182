"""GPT-2-small shape, batch-1 decode through `generate()` (as bench.py times it) and through `engine.step()`
driven directly, with the one-token steps' kernels switched in turns: the greedy pick by torch.argmax or the
Triton kernel, and each block's add + norm + first product as separate kernels or one `norm_gemv`. Variants
take turns, several rounds, each on a fresh engine (graphs capture the kernels they meet). Prints ms/token per
variant and round, then medians."""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import djinn  # noqa: E402
import djinn.engine.sampling as sampling  # noqa: E402
import djinn.models.gpt2 as gpt2  # noqa: E402
from benchmarks import bench  # noqa: E402
from benchmarks.bench import batch1_ms_per_token  # noqa: E402
from benchmarks.gpu_smoke import GPT2_SMALL  # noqa: E402
from djinn.engine.engine import Engine  # noqa: E402
from djinn.models.loading import load_random  # noqa: E402

FUSED_PICK, FUSED_NORM = sampling.greedy_pick, gpt2.normed_linear


def separate_norm(norm, linear, resid, pending, gelu=False):
    resid, x = norm.add_and_norm(resid, pending)
    out = linear(x)
    return resid, torch.nn.functional.gelu(out, approximate="tanh") if gelu else out


VARIANTS = {  # name: (greedy pick, norm + product)
    "torch argmax, separate norms": (lambda logits, tallies=None: logits.argmax(-1), separate_norm),
    "torch argmax, norm_gemv": (lambda logits, tallies=None: logits.argmax(-1), FUSED_NORM),
    "argmax kernel, separate norms": (FUSED_PICK, separate_norm),
    "argmax kernel, norm_gemv": (FUSED_PICK, FUSED_NORM),
}


def step_ms(loaded, kv_memory: int = 2 << 30, steps: int = 200) -> float:
    """engine.step() driven directly (no engine thread) for one decoding session."""
    engine = Engine([loaded], kv_memory=kv_memory)
    sid = engine.create_session("x")
    engine.generate(sid, "x", list(range(100, 116)), lambda ev: None, max_new_tokens=steps + 200, stop_tokens=[])
    for _ in range(20):
        engine.step()
    t = bench.now()
    for _ in range(steps):
        engine.step()
    return (bench.now() - t) * 1000 / steps


def main(rounds: int) -> None:
    loaded = load_random(GPT2_SMALL, torch.float16, torch.device("cuda"), seed=0, name="gpt2-small-random")
    results: dict[str, list[tuple[float, float]]] = {v: [] for v in VARIANTS}
    for round_ in range(rounds):
        for name, (pick, norm_linear) in VARIANTS.items():
            gc.collect()  # the last variant's engines, their graphs and KV memory, go first
            sampling.greedy_pick, gpt2.normed_linear = pick, norm_linear
            client = djinn.connect(model=loaded, kv_memory=2 << 30)
            batch1_ms_per_token(client, trials=1)  # graphs captured
            gen = batch1_ms_per_token(client)
            client.close()
            results[name].append((gen, step_ms(loaded)))
            print(f"round {round_}, {name}: generate {gen:.3f} ms/token, "
                  f"engine.step() {results[name][-1][1]:.3f} ms",
                  flush=True)
    sampling.greedy_pick, gpt2.normed_linear = FUSED_PICK, FUSED_NORM
    print("\nmedians over the rounds:")
    for name, rows in results.items():
        print(f"  {name}: generate {statistics.median(r[0] for r in rows):.3f} ms/token, engine.step() "
              f"{statistics.median(r[1] for r in rows):.3f} ms")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    main(ap.parse_args().rounds)

"""Batch-1 decode with the step's Triton kernels launched plainly and as programmatic dependents
(djinn/kernels/dependent_launch.py), for the GPT-2-small shape (float16) and the Mistral-7B shape
(bfloat16), random weights. Variants take turns, each round on fresh engines (graphs capture the launches
they meet): ms per step of `engine.step()` driven directly, and for GPT-2 `generate()` as bench.py times it.
Each variant's greedy tokens and logits (64 new tokens, and the same with an unmodified pause at layer 6 on
every step) must be the plain launches' bits. Prints every measurement, then medians and the bit checks."""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import djinn  # noqa: E402
from benchmarks import bench  # noqa: E402
from benchmarks.bench import step_ms, through_client  # noqa: E402
from djinn.kernels import dependent_launch  # noqa: E402
from djinn.models.loading import load_random  # noqa: E402

VARIANTS = {"plain launches": False, "dependent launches": True}


def use(variant: str) -> None:
    dependent_launch.set_enabled(VARIANTS[variant])
    gc.collect()  # the last variant's engines, their graphs and KV memory, go first


def outputs(loaded, prompt: list[int]) -> tuple[list[int], torch.Tensor, list[int], torch.Tensor]:
    """(tokens, logits) of 64 greedy tokens, then the same with an unmodified pause at layer 6 on every step."""
    client = djinn.connect(model=loaded, kv_memory=2 << 30)
    out = client.session().generate(prompt, max_new_tokens=64, return_logits=True, stop_tokens=[])
    bp = [djinn.Breakpoint("blocks.6.hook_resid_post", steps=list(range(64)))]
    for ev in client.session().stream(prompt, max_new_tokens=64, return_logits=True, breakpoints=bp, stop_tokens=[]):
        if isinstance(ev, djinn.Paused):
            ev.resume()
        elif isinstance(ev, djinn.Done):
            paused = ev.result
    client.close()
    return out.token_ids, out.logits, paused.token_ids, paused.logits


gpt2_generate_ms = through_client(bench.generate_tokens, trials=3)  # (loaded, kv_memory, n_new) -> ms/token


def main(rounds: int, shapes: list[str]) -> None:
    print(f"torch {torch.__version__}, triton {__import__('triton').__version__}, "
          f"{torch.cuda.get_device_name()}; dependent launches supported: {dependent_launch.supported()}")
    prompt = list(range(100, 116))
    summary = []
    for shape in shapes:
        spec = bench.SHAPES[shape]
        loaded = load_random(spec["cfg"], spec["dtype"], torch.device("cuda"), seed=0, name=f"{shape}-random")
        steps = 200 if shape == "gpt2" else 50
        results: dict[str, dict[str, list[float]]] = {v: {"step": [], "generate": []} for v in VARIANTS}
        bits: dict[str, tuple] = {}
        for r in range(rounds):
            for variant in VARIANTS:
                use(variant)
                if r == 0:
                    bits[variant] = outputs(loaded, prompt)
                results[variant]["step"].append(step_ms(loaded, steps=steps))
                line = f"{shape} round {r + 1}  {variant:<20} engine.step() {results[variant]['step'][-1]:.3f} ms"
                if shape == "gpt2":
                    results[variant]["generate"].append(gpt2_generate_ms(loaded, 2 << 30, 256))
                    line += f", generate() {results[variant]['generate'][-1]:.3f} ms/token"
                print(line, flush=True)
        ref = bits["plain launches"]
        for variant in VARIANTS:
            same = [a == b if isinstance(a, list) else torch.equal(a, b) for a, b in zip(bits[variant], ref)]
            row = f"{shape:<8} {variant:<20} step {statistics.median(results[variant]['step']):.3f} ms"
            if shape == "gpt2":
                row += f", generate() {statistics.median(results[variant]['generate']):.3f} ms/token"
            summary.append(row + f"; tokens, logits, paused tokens, paused logits bit-identical to plain: {same}")
        paused_same = ref[2] == ref[0] and torch.equal(ref[3], ref[1])
        summary.append(f"{shape:<8} plain launches: pausing at layer 6 every step changes nothing: {paused_same}")
        del loaded
        gc.collect()
        torch.cuda.empty_cache()
    print(f"\nmedians of {rounds} rounds (batch 1, 16-token prompt):")
    print("\n".join(summary))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shapes", nargs="+", default=["gpt2", "mistral"], choices=sorted(bench.SHAPES))
    args = ap.parse_args()
    main(args.rounds, args.shapes)

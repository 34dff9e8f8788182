"""Two builds of Djinn side by side on one GPU: the working tree against a baseline source tree (for example
`git archive <commit> djinn benchmarks | tar -x -C /tmp/base`). Rounds alternate the builds, each
measurement in a fresh process whose imports come from that build's tree. Per build: batch-1 `engine.step()`
driven directly and `generate()` as bench.py times it for the GPT-2-small shape (float16), batch-1
`engine.step()` for the Mistral-7B shape (bfloat16), and the Mistral shape's step with 64 sessions decoding
together (128-token prompts). Prints every measurement, then medians and each figure's ratio new / baseline."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run inside a build's tree: only names both builds have, or an import that falls back for older trees.
MEASURE = r"""
import json, sys, time
import torch
sys.path.insert(0, '.')
from benchmarks import bench
try:
    from benchmarks.bench import step_ms, through_client
except ImportError:  # a baseline tree from before they moved into bench.py
    from benchmarks.experiment_batch1_paths import through_client
    from benchmarks.experiment_one_token import step_ms
from djinn.engine.engine import Engine
from djinn.models.loading import load_random

def sessions_step_ms(loaded, n_sessions):
    engine = Engine([loaded], kv_memory=20 << 30)
    g = torch.Generator().manual_seed(0)
    for _ in range(n_sessions):
        sid = engine.create_session('m')
        engine.generate(sid, 'm', torch.randint(0, 32000, (128,), generator=g).tolist(), lambda ev: None,
                        max_new_tokens=200, stop_tokens=[])
    for _ in range(30):  # the prompts, then warm-up: graphs captured
        engine.step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(40):
        engine.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1000 / 40

out = {}
spec = bench.SHAPES['gpt2']
gpt2 = load_random(spec['cfg'], spec['dtype'], torch.device('cuda'), seed=0, name='gpt2')
out['gpt2 step ms'] = step_ms(gpt2)
out['gpt2 generate ms/token'] = through_client(bench.generate_tokens, trials=3)(gpt2, 2 << 30, 256)
del gpt2
spec = bench.SHAPES['mistral']
mistral = load_random(spec['cfg'], spec['dtype'], torch.device('cuda'), seed=0, name='m')
out['mistral step ms'] = step_ms(mistral, steps=50)
out['mistral 64 sessions step ms'] = sessions_step_ms(mistral, 64)
print('RESULT ' + json.dumps(out))
"""


def measure(tree: str) -> dict[str, float]:
    run = subprocess.run([sys.executable, "-c", MEASURE], cwd=tree, capture_output=True, text=True, timeout=280)
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
    if run.returncode != 0 or not lines:
        raise RuntimeError(f"measuring {tree} failed:\n{run.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(baseline: str, rounds: int) -> None:
    import torch  # noqa: F401 (the device's name and versions, for the record)

    print(f"torch {torch.__version__}, triton {__import__('triton').__version__}, {torch.cuda.get_device_name()}; "
          f"baseline {baseline}, new {HERE}", flush=True)
    builds = {"baseline": baseline, "new": HERE}
    results: dict[str, list[dict[str, float]]] = {b: [] for b in builds}
    for r in range(rounds):
        order = list(builds) if r % 2 == 0 else list(reversed(builds))
        for b in order:
            results[b].append(measure(builds[b]))
            print(f"round {r + 1} {b:<8} " + ", ".join(f"{k} {v:.3f}" for k, v in results[b][-1].items()), flush=True)
    print("\nmedians over the rounds (new / baseline):")
    for key in results["new"][0]:
        base, new = (statistics.median(m[key] for m in results[b]) for b in ("baseline", "new"))
        print(f"  {key:<28} baseline {base:.3f}  new {new:.3f}  ratio {new / base:.3f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", required=True, help="the baseline build's source tree (djinn/ and benchmarks/)")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    main(os.path.abspath(args.baseline), args.rounds)

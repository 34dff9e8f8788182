"""Few-row matrix products (decode steps of 2-64 sessions): the Triton kernel (djinn/kernels/skinny_matmul.py)
over its settings against PyTorch's F.linear (cuBLAS) for the Mistral-7B and GPT-2-small shapes, timed inside
CUDA graphs. Each timed call reads a different copy of the weights (together larger than the 50 MB L2), as
a decode step's layers do. Checks every setting against a float64 product, and that a row's result is the
same bits whatever the number of rows. Prints GB/s of weights streamed per shape and row count, then the
settings ranked by the matrix-product time of a decode step.

    python3 benchmarks/bench_skinny_matmul.py
"""
import itertools
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import djinn.kernels.skinny_matmul as sm  # noqa: E402
from benchmarks.bench_gemv import LAYERS, SHAPES  # noqa: E402
from benchmarks.tune_attention import gpu_us  # noqa: E402

ROWS = (2, 8, 32, 64)
SETTINGS = list(itertools.product((16, 32, 64), (64, 128, 256), (4,), (3, 4, 5))) + [
    (32, 128, 8, 4), (64, 128, 8, 4), (64, 256, 8, 3)]


def gpu_us_rotating(fns, replays: int = 15) -> float:
    """Median GPU time of one call, the calls cycling through `fns` (one per weight copy) inside a graph."""
    return gpu_us(lambda: [f() for f in fns], calls=1, replays=replays) / len(fns)


def main() -> None:
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    ref_us = {}
    ours_us = {s: {} for s in SETTINGS}
    broken = set()
    for name, (n, k, dtype, has_bias) in SHAPES.items():
        bytes_w = n * k * 2
        copies = max(2, min(16, -(-(256 << 20) // bytes_w)))
        ws = [torch.randn(n, k, device="cuda", dtype=dtype) / k ** 0.5 for _ in range(copies)]
        b = torch.randn(n, device="cuda", dtype=dtype) if has_bias else None
        xs = {m: torch.randn(m, k, device="cuda", dtype=dtype) for m in ROWS}
        for m in ROWS:
            x = xs[m]
            ref_us[(name, m)] = gpu_us_rotating([lambda w=w: F.linear(x, w, b) for w in ws])
            exact = (x.double() @ ws[0].double().T + (0 if b is None else b.double())).float()
            for setting in SETTINGS:
                if setting in broken:
                    continue
                sm.BLOCK_N, sm.BLOCK_K, sm.NUM_WARPS, sm.NUM_STAGES = setting
                try:
                    got = sm.skinny_matmul(x, ws[0], b)
                except Exception as e:  # a setting the compiler cannot fit (shared memory): dropped
                    print(f"  {setting} dropped: {type(e).__name__}", flush=True)
                    broken.add(setting)
                    continue
                err = (got.float() - exact).abs().max().item()
                assert err < 0.05, (name, m, setting, err)
                alone = sm.skinny_matmul(x[:1].contiguous(), ws[0], b)
                assert torch.equal(alone[0], got[0]), (name, m, setting, "row result depends on the row count")
                ours_us[setting][(name, m)] = gpu_us_rotating([lambda w=w: sm.skinny_matmul(x, w, b) for w in ws])
            live = [s for s in SETTINGS if s not in broken]
            top = min(live, key=lambda s: ours_us[s][(name, m)])
            gb = bytes_w / 1e3
            print(f"{name} x{m}: F.linear {ref_us[(name, m)]:.1f} us ({gb / ref_us[(name, m)]:.0f} GB/s); best {top}: "
                  f"{ours_us[top][(name, m)]:.1f} us ({gb / ours_us[top][(name, m)]:.0f} GB/s)", flush=True)

    def step_us(times: dict, model: str, m: int) -> float:
        return sum(t * (1 if "lm_head" in n else LAYERS[model]) for (n, mm), t in times.items()
                   if n.startswith(model) and mm == m)

    live = [s for s in SETTINGS if s not in broken]
    for model in LAYERS:
        for m in ROWS:
            ranked = sorted(live, key=lambda s: step_us(ours_us[s], model, m))
            print(f"\n{model} x{m}: matrix products per step, F.linear {step_us(ref_us, model, m):.0f} us; ours "
                  f"(block_n, block_k, warps, stages):")
            for s in ranked[:3]:
                print(f"  {s}: {step_us(ours_us[s], model, m):.0f} us")
    total = {s: sum(step_us(ours_us[s], model, m) / step_us(ref_us, model, m) for model in LAYERS for m in ROWS)
             for s in live}
    print("\nbest over both shapes and all row counts (sum of time ratios to F.linear):")
    for s in sorted(live, key=total.get)[:5]:
        print(f"  {s}: mean ratio {total[s] / (len(LAYERS) * len(ROWS)):.3f}")


if __name__ == "__main__":
    main()

"""One-token matrix products: the Triton GEMV (djinn/kernels/gemv.py) over its settings against PyTorch's
F.linear (cuBLAS) for the Mistral-7B and GPT-2-small shapes, timed inside CUDA graphs. Prints GB/s of
weights streamed per shape, then the settings ranked by the matrix-product time of one decode step."""
import itertools
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import djinn.kernels.gemv as gv  # noqa: E402
from benchmarks.tune_attention import gpu_us  # noqa: E402

SHAPES = {  # name: (N, K, dtype, bias)
    "mistral qkv": (6144, 4096, torch.bfloat16, False),
    "mistral o_proj": (4096, 4096, torch.bfloat16, False),
    "mistral gate_up": (28672, 4096, torch.bfloat16, False),
    "mistral down": (4096, 14336, torch.bfloat16, False),
    "mistral lm_head": (32000, 4096, torch.bfloat16, False),
    "gpt2 qkv": (2304, 768, torch.float16, True),
    "gpt2 proj": (768, 768, torch.float16, True),
    "gpt2 fc": (3072, 768, torch.float16, True),
    "gpt2 mlp proj": (768, 3072, torch.float16, True),
    "gpt2 lm_head": (50257, 768, torch.float16, False),
}


LAYERS = {"mistral": 32, "gpt2": 12}  # each per-layer product runs this often in a step; lm_head once


def main() -> None:
    settings = list(itertools.product((8, 16, 32), (256, 512, 1024), (4, 8), (2, 4)))
    ref_us, gemv_us = {}, {s: {} for s in settings}
    for name, (n, k, dtype, has_bias) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=dtype) / k ** 0.5
        b = torch.randn(n, device="cuda", dtype=dtype) if has_bias else None
        x = torch.randn(1, k, device="cuda", dtype=dtype)
        gbytes = w.numel() * w.element_size() / 1e3
        ref_us[name] = gpu_us(lambda: F.linear(x, w, b))
        exact = F.linear(x.float(), w.float(), None if b is None else b.float())
        for setting in settings:
            gv.BLOCK_N, gv.BLOCK_K, gv.NUM_WARPS, gv.NUM_STAGES = setting
            assert (gv.gemv(x, w, b).float() - exact).abs().max().item() < 0.05
            gemv_us[setting][name] = gpu_us(lambda: gv.gemv(x, w, b))
        top = min(settings, key=lambda s: gemv_us[s][name])
        print(f"{name}: F.linear {ref_us[name]:.1f} us ({gbytes / ref_us[name]:.0f} GB/s); best gemv {top}: "
              f"{gemv_us[top][name]:.1f} us ({gbytes / gemv_us[top][name]:.0f} GB/s)", flush=True)

    def step_us(times: dict, model: str) -> float:
        return sum(t * (1 if "lm_head" in n else LAYERS[model]) for n, t in times.items() if n.startswith(model))

    for model in LAYERS:
        ranked = sorted(settings, key=lambda s: step_us(gemv_us[s], model))
        print(f"\n{model}: matrix products per step, F.linear {step_us(ref_us, model):.0f} us; gemv (block_n, block_k,"
              f" warps, stages):")
        for s in ranked[:4]:
            print(f"  {s}: {step_us(gemv_us[s], model):.0f} us")


if __name__ == "__main__":
    main()

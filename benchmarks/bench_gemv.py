"""One-token matrix products: the Triton GEMV (djinn/kernels/gemv.py) over its settings against PyTorch's
F.linear (cuBLAS) for the Mistral-7B and GPT-2-small shapes, timed inside CUDA graphs. Prints GB/s of
weights streamed per shape, then the settings ranked by the matrix-product time of one decode step.

`--fused`: a block's add + norm + first product (+ GPT-2's GELU) as separate kernels against `norm_gemv`,
each product on its own copy of the weights (as a step's layers are: no copy is still in L2); and the greedy
pick, torch.argmax against the Triton kernel (djinn/kernels/argmax.py), bit for bit."""
import argparse
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


def fused() -> None:
    from djinn.kernels.argmax import argmax
    from djinn.kernels.fused import norm

    shapes = {  # name: (N, K, dtype, rms, gelu)
        "gpt2 ln1 + qkv": (2304, 768, torch.float16, False, False),
        "gpt2 ln2 + fc + gelu": (3072, 768, torch.float16, False, True),
        "mistral ln1 + qkv": (6144, 4096, torch.bfloat16, True, False),
        "mistral ln2 + gate_up": (28672, 4096, torch.bfloat16, True, False),
    }
    for name, (n, k, dtype, rms, gelu) in shapes.items():
        copies = max(1, (256 << 20) // (n * k * 2))
        ws = [torch.randn(n, k, device="cuda", dtype=dtype) / k ** 0.5 for _ in range(copies)]
        b = None if rms else torch.randn(n, device="cuda", dtype=dtype)
        nw, nb = torch.rand(k, device="cuda") + 0.5, None if rms else torch.randn(k, device="cuda")
        x, r = torch.randn(1, k, device="cuda", dtype=dtype), torch.randn(1, k, device="cuda", dtype=dtype)

        def separate():
            for w in ws:
                _, h = norm(x, r, nw, nb, 1e-5, rms)
                out = gv.gemv(h, w, b)
                if gelu:
                    F.gelu(out, approximate="tanh")

        def fused_kernel():
            for w in ws:
                gv.norm_gemv(x, r, nw, nb, 1e-5, rms, w, b, gelu)

        times = {"separate kernels": gpu_us(separate, calls=1) / copies,
                 "norm_gemv": gpu_us(fused_kernel, calls=1) / copies}
        print(f"{name} ({copies} weight copies): " + ", ".join(f"{m} {t:.2f} us" for m, t in times.items()),
              flush=True)
    for rows, vocab, dtype in ((1, 50257, torch.float16), (1, 32000, torch.bfloat16), (64, 32000, torch.bfloat16),
                               (128, 32000, torch.bfloat16)):
        logits = torch.randn(rows, vocab, device="cuda", dtype=dtype)
        same = torch.equal(argmax(logits), logits.argmax(-1))
        print(f"greedy pick {rows} x {vocab}: torch.argmax {gpu_us(lambda: logits.argmax(-1)):.2f} us, kernel "
              f"{gpu_us(lambda: argmax(logits)):.2f} us (same indices: {same})", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fused", action="store_true", help="the fused one-token kernels against separate ones")
    if ap.parse_args().fused:
        fused()
    else:
        main()

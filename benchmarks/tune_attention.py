"""Times the Triton paged attention over its tile settings for the shapes the benchmarks run (decode at batch
1 and 64, a 512-token prefill), to pick the defaults in djinn/kernels/paged_attention.py. Prints one line per
setting and shape, then the settings ranked by their total over all shapes."""
import itertools
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import djinn.kernels.paged_attention as pa  # noqa: E402

BS = 16
# name: (n_heads, n_kv_heads, d_head, dtype, query positions per row, rows, max_context as the caller passes it)
SHAPES = {
    "mistral decode 1 x 330": (32, 8, 128, torch.bfloat16, [329], 1, 4096),
    "mistral decode 64 x 320": (32, 8, 128, torch.bfloat16, [319], 64, 4096),
    "gpt2 decode 1 x 600": (12, 12, 64, torch.float16, [599], 1, 1024),
    "mistral prefill 512": (32, 8, 128, torch.bfloat16, list(range(512)), 1, 512),
}


def case(h, kvh, d, dtype, qpos, n_rows, max_context):
    ctx = max(qpos) + 1
    per_row = -(-ctx // BS)
    kv = torch.randn(n_rows * per_row, 2, BS, kvh, d, device="cuda", dtype=dtype)
    tables = torch.randperm(n_rows * per_row, device="cuda").view(n_rows, per_row).int()
    n = n_rows * len(qpos)
    q = torch.randn(n, h, d, device="cuda", dtype=dtype)
    rows = torch.arange(n_rows, device="cuda", dtype=torch.int32).repeat_interleave(len(qpos))
    pos = torch.tensor(qpos * n_rows, device="cuda", dtype=torch.int32)
    return lambda: pa.paged_attention_triton(q, kv, tables, rows, pos, d ** -0.5, 0, max_context)


def main() -> None:
    cases = {name: case(*shape) for name, shape in SHAPES.items()}
    totals = {}
    for chunk, block_n, warps, stages in itertools.product((128, 256), (32, 64), (4, 8), (1, 2, 3)):
        pa.CHUNK, pa.BLOCK_N, pa.NUM_WARPS, pa.NUM_STAGES = chunk, block_n, warps, stages
        key = f"chunk {chunk} block_n {block_n} warps {warps} stages {stages}"
        times = [triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median") * 1000 for f in cases.values()]
        totals[key] = times
        print(key + ": " + ", ".join(f"{n} {t:.1f} us" for n, t in zip(cases, times)), flush=True)
    print("\nranked by the sum over the shapes:")
    for key, times in sorted(totals.items(), key=lambda kv: sum(kv[1]))[:8]:
        print(f"{sum(times):8.1f} us  {key}  ({', '.join(f'{t:.1f}' for t in times)})")


if __name__ == "__main__":
    main()

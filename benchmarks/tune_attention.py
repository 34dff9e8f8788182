"""Times the Triton paged attention for a few tile shapes (Mistral-7B decode, 64 rows) to pick the defaults."""
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import djinn.kernels.paged_attention as pa  # noqa: E402

n, h, kvh, d, bs, ctx = 64, 32, 8, 128, 16, 320
blocks = n * (ctx // bs)
kv = torch.randn(blocks, 2, bs, kvh, d, device="cuda", dtype=torch.bfloat16)
tables = torch.randperm(blocks, device="cuda").view(n, ctx // bs).int()
q = torch.randn(n, h, d, device="cuda", dtype=torch.bfloat16)
rows = torch.arange(n, device="cuda", dtype=torch.int32)
pos = torch.full((n,), ctx - 1, device="cuda", dtype=torch.int32)
ref = None
for chunk in (128, 256):
    for block_n in (32, 64, 128):
        for warps in (4, 8):
            pa.CHUNK, pa.BLOCK_N, pa.NUM_WARPS = chunk, block_n, warps
            f = lambda: pa.paged_attention_triton(q, kv, tables, rows, pos, d ** -0.5, 0, 4096)
            out = f()
            ref = out if ref is None else ref
            ms = triton.testing.do_bench(f, warmup=50, rep=200, return_mode="median")
            kv_bytes = n * ctx * kvh * d * 2 * 2
            print(f"chunk {chunk} block_n {block_n} warps {warps}: {ms * 1000:.1f} us "
                  f"({kv_bytes / ms / 1e6:.0f} GB/s) maxdiff {(out.float() - ref.float()).abs().max().item():.2e}")

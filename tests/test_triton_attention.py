"""The Triton paged-attention kernel computes what the portable SDPA path computes. Runs through Triton's
CPU interpreter here; the GPU benchmark runs it compiled."""
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton", reason="Triton is not installed (the kernel is only used on GPUs)")

SCRIPT = textwrap.dedent("""
    import torch
    from djinn.engine.batch import RowSpan, build_context
    from djinn.models.attention import paged_attention
    torch.manual_seed(0)
    for n_heads, n_kv, d_head, window in [(4, 2, 16, None), (8, 8, 8, None), (8, 2, 32, 5), (6, 3, 12, None)]:
        bs, n_blocks = 4, 40
        kv = torch.randn(n_blocks, 1, 2, bs, n_kv, d_head)
        spans = [RowSpan(0, 7, [3, 9]), RowSpan(5, 1, [1, 2]), RowSpan(9, 4, [5, 6, 7, 8]), RowSpan(2, 3, [11])]
        n = sum(s.n_tokens for s in spans)
        q, k, v = torch.randn(n, n_heads, d_head), torch.randn(n, n_kv, d_head), torch.randn(n, n_kv, d_head)
        outs = []
        for use_kernel in (False, True):
            ctx, _ = build_context(spans, [0] * n, kv, bs, window, torch.device("cpu"), use_kernel=use_kernel)
            cache = kv.clone()
            outs.append(paged_attention(q, k, v, cache[:, 0], ctx.attention, d_head ** -0.5))
        err = (outs[0] - outs[1]).abs().max().item()
        assert err < 1e-5, (n_heads, n_kv, d_head, window, err)
    print("ok")
""")


def test_kernel_matches_portable_path():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]

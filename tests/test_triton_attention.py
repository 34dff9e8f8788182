"""The Triton kernels (paged attention, rotary + KV write, RMSNorm and LayerNorm with a fused residual add,
SwiGLU, one-row GEMV with and without the norm and GELU around it, few-row product, greedy pick, embedding
rows and fed token ids) compute what
the portable PyTorch path computes. Runs through Triton's CPU interpreter
here; on GPUs they run compiled."""
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton", reason="Triton is not installed (the kernel is only used on GPUs)")

SCRIPT = textwrap.dedent("""
    import itertools
    import torch
    import torch.nn.functional as F
    import djinn.kernels.paged_attention as pa
    from djinn.engine.batch import RowSpan, build_context
    from djinn.kernels.fused import norm, silu_mul
    from djinn.models.attention import paged_attention
    from djinn.models.layers import LayerNorm, RMSNorm, Rotary
    torch.manual_seed(0)
    for ref in (RMSNorm(48, 1e-5), LayerNorm(48, 1e-5)):
        ref.weight.data, bias = torch.randn(48), None
        if ref.bias is not None:
            ref.bias.data = bias = torch.randn(48)
        for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 1e-2)):
            x, r = torch.randn(5, 48, dtype=dtype), torch.randn(5, 48, dtype=dtype)
            same, normed = norm(x, None, ref.weight, bias, 1e-5, ref.rms)
            assert same is x and (normed.float() - ref.reference(x.float())).abs().max() < tol
            total, fused = norm(x, r, ref.weight, bias, 1e-5, ref.rms)
            assert torch.equal(total, x + r)  # the add rounds as a separate add does
            assert torch.equal(fused, norm(x + r, None, ref.weight, bias, 1e-5, ref.rms)[1])
    from djinn.kernels.gemv import gemv
    for n_out, n_in, bias in ((37, 600, torch.randn(37)), (64, 1024, None)):  # a ragged and an even shape
        w, x = torch.randn(n_out, n_in), torch.randn(1, n_in)
        assert (gemv(x, w, bias) - F.linear(x, w, bias)).abs().max() < 1e-4
    from djinn.kernels.gemv import norm_gemv
    for (n_out, n_in), rms, dtype in itertools.product(((37, 600), (64, 1024)), (True, False), (torch.float32, torch.float16)):
        x, r = torch.randn(1, n_in, dtype=dtype), torch.randn(1, n_in, dtype=dtype)
        nw, nb = torch.randn(n_in), None if rms else torch.randn(n_in)
        w, b = torch.randn(n_out, n_in, dtype=dtype), torch.randn(n_out, dtype=dtype)
        for res, gelu in itertools.product((None, r), (False, True)):
            total, out = norm_gemv(x, res, nw, nb, 1e-5, rms, w, b, gelu)
            same, normed = norm(x, res, nw, nb, 1e-5, rms)  # the separate kernels: norm, product, activation
            ref = F.linear(normed.float(), w.float(), b.float()).to(dtype).float()
            ref = F.gelu(ref, approximate="tanh") if gelu else ref
            assert torch.equal(total, same) and (res is not None or total is x)  # the add rounds as they do
            assert ((out.float() - ref).abs() / (1 + ref.abs())).max() < (1e-4 if dtype == torch.float32 else 2e-3)
    import djinn.kernels.argmax as am
    for am.SLICE, dtype in itertools.product((am.SLICE, 1024), (torch.float32, torch.float16, torch.bfloat16)):
        x = torch.randn(6, 3000).to(dtype)  # one slice a row, then three
        x[1, 2000] = x[1, 2900] = x[1].max() + 1  # a tie (across slices): the first index
        x[2] = float("-inf")
        x[3, 2500] = x[3, 2999] = float("nan")  # a NaN counts as the maximum, the first one
        x[4] = 1.0
        x[5, 1500], x[5, 10] = float("nan"), float("inf")
        slots = torch.zeros(8, dtype=torch.int32)
        for _ in range(2):  # the rows' tallies are back at zero after each launch
            picks, finite = am.argmax(x, slots)
            assert torch.equal(picks, x.argmax(-1)), (am.SLICE, dtype, picks, x.argmax(-1))
            assert finite.tolist() == [1, 1, 0, 0, 1, 0]  # rows 2 (all -inf), 3 and 5 are not finite
            assert not slots.any()
    from djinn.kernels.skinny_matmul import skinny_matmul
    for n_out, n_in, bias in ((37, 200, torch.randn(37)), (96, 256, None)):  # K ragged for the tile, and even
        w, x = torch.randn(n_out, n_in), torch.randn(64, n_in)
        for m in (2, 5, 64):
            got = skinny_matmul(x[:m], w, bias)
            assert got.shape == (m, n_out) and (got - F.linear(x[:m], w, bias)).abs().max() < 1e-3
            assert torch.equal(got[0], skinny_matmul(x[:1], w, bias)[0])  # a row's bits: whatever the row count
    from djinn.kernels.embed import embed, fed_tokens
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        table, pos_table = torch.randn(50, 1100).to(dtype), torch.randn(20, 1100).to(dtype)  # rows over 2 programs
        tokens, positions = torch.tensor([3, 49, 0, 3]), torch.tensor([0, 19, 7, 1])
        assert torch.equal(embed(table, tokens), F.embedding(tokens, table))
        if dtype != torch.bfloat16:  # the interpreter truncates float32 to bfloat16 (compiled code rounds)
            assert torch.equal(embed(table, tokens, pos_table, positions), table[tokens] + pos_table[positions])
    sampled = torch.tensor([7, 8, 9])
    assert fed_tokens(torch.tensor([1, 2, 3, 4]), torch.tensor([-1, 2, 0, -1]), sampled).tolist() == [1, 9, 7, 4]
    gu = torch.randn(6, 2 * 40)
    assert (silu_mul(gu) - F.silu(gu[:, :40]) * gu[:, 40:]).abs().max() < 1e-5
    # (n_heads, n_kv, d_head, window, block size, starts, soft-cap)
    cases = [(4, 2, 16, 0, 4, (0, 5, 9, 2), 0.0), (8, 8, 8, 0, 4, (0, 5, 9, 2), 0.0), (8, 2, 32, 5, 4, (0, 5, 9, 2), 2.0), (6, 3, 12, 0, 4, (0, 5, 9, 2), 0.0), (4, 1, 16, 0, 16, (130, 250, 3, 120), 0.5), (4, 2, 16, 40, 16, (200, 140, 7, 66), 0.0)]
    # the defaults, then small chunks shared out over 2 programs: rows span many chunks; then every batch
    # counted large (one program a token and KV head merges as it goes): at the defaults, and small chunks over
    # 2 programs; then prompts' query rows at 16 and 6: their tokens taken 16/8/4 and 6/3/1 at a time by head
    # layout (tiles that straddle rows, and one wider than the whole step)
    small, programs = pa.SMALL, pa.PROGRAMS
    settings = [(pa.CHUNK, pa.PROGRAMS_SMALL, pa.BLOCK_N, 1, small, programs), (16, 2, 16, 1, small, programs),
                (pa.CHUNK, pa.PROGRAMS_SMALL, pa.BLOCK_N, 1, 0, programs), (16, 2, 16, 1, 0, 2),
                (pa.CHUNK, pa.PROGRAMS_SMALL, pa.BLOCK_N, 16, small, programs), (16, 2, 16, 6, small, programs)]
    slots = torch.zeros(64, dtype=torch.int32)  # one engine's tallies, reused by every launch
    decode_kernel = {}  # (chunk, case, rope) -> the one-token kernel's output: merged by one program or the last
    # each case with prompts in the step, then as a one-token step, where the kernel writes the keys itself
    for (pa.CHUNK, pa.PROGRAMS_SMALL, pa.BLOCK_N, pa.PREFILL_QUERY_ROWS, pa.SMALL, pa.PROGRAMS), (n_heads, n_kv, d_head, window, bs, starts, softcap), lens in itertools.product(settings, cases, ((7, 1, 4, 3), (1, 1, 1, 1))):
        if max(lens) == 1 and pa.PREFILL_QUERY_ROWS > 1:
            continue  # the prompt kernel's setting: no prompt here
        n_blocks = sum(-(-(s + n) // bs) for s, n in zip(starts, lens)) + 1
        kv = torch.randn(n_blocks, 1, 2, bs, n_kv, d_head, generator=torch.Generator().manual_seed(n_blocks))
        perm = torch.randperm(n_blocks - 1, generator=torch.Generator().manual_seed(n_blocks)).tolist()
        spans, used = [], 0
        for s, n in zip(starts, lens):
            k = -(-(s + n) // bs)
            spans.append(RowSpan(s, n, perm[used:used + k]))
            used += k
        n = sum(s.n_tokens for s in spans)
        qkv = torch.randn(n, n_heads + 2 * n_kv, d_head, generator=torch.Generator().manual_seed(n))
        q, k, v = qkv.split([n_heads, n_kv, n_kv], dim=1)
        # no rotary, rotary over whole heads, over half of each head (GPT-NeoX's partial rotary)
        for rope in (None, Rotary(d_head, 512, 10000.0, None), Rotary(d_head // 2, 512, 10000.0, None)):
            outs, caches = [], []
            # the portable path, the kernel; for one-token steps also with the rotary + KV write kernel first
            for use_kernel, separate_write in ((False, False), (True, False)) + (((True, True),) if n == 4 else ()):
                ctx, _ = build_context(spans, [0] * n, kv, bs, torch.device("cpu"), use_kernel=use_kernel,
                                       tallies=slots if use_kernel else None)
                ctx.attention.prefill |= separate_write  # (query rows 1: the one-token kernel all the same)
                cache = kv.clone()
                outs.append(paged_attention(q, k, v, cache[:, 0], ctx.attention, d_head ** -0.5, rope=rope,
                                            window=window, softcap=softcap))
                caches.append(cache)
                assert not slots.any()  # every tally back at zero
            err = (outs[0] - outs[1]).abs().max().item()
            assert err < 1e-5, (pa.CHUNK, pa.PREFILL_QUERY_ROWS, pa.SMALL, pa.PROGRAMS, n_heads, n_kv, d_head, window, rope and rope.dim, lens, err)
            assert (caches[0] - caches[1]).abs().max().item() < 1e-5
            if len(outs) == 3:  # the keys written inside the attention kernel: the same bits as the write kernel's
                assert torch.equal(outs[1], outs[2]) and torch.equal(caches[1], caches[2])
            if pa.PREFILL_QUERY_ROWS == 1:  # every token through the one-token kernel
                key = (pa.CHUNK, n_heads, n_kv, d_head, window, bs, starts, lens, rope and rope.dim, softcap)
                assert torch.equal(decode_kernel.setdefault(key, outs[1]), outs[1]), key
    # NaN in every cache slot outside the rows' own contexts (unused blocks, the tails of their last blocks):
    # both paths read none of it, prompt and one-token steps alike
    for lens in ((7, 1, 4, 3), (1, 1, 1, 1)):
        n_heads, n_kv, d_head, bs, starts = 4, 2, 16, 4, (0, 5, 9, 2)
        kv = torch.full((16, 1, 2, bs, n_kv, d_head), float("nan"))
        spans, used = [], 0
        for s, n in zip(starts, lens):
            k = -(-(s + n) // bs)
            spans.append(RowSpan(s, n, list(range(used + 1, used + 1 + k))))  # block 0: the padding's, all NaN
            for p in range(s):
                kv[spans[-1].block_table[p // bs], :, :, p % bs] = torch.randn(1, 2, n_kv, d_head)
            used += k
        n = sum(lens)
        q, k, v = torch.randn(n, n_heads, d_head), torch.randn(n, n_kv, d_head), torch.randn(n, n_kv, d_head)
        outs = []
        for use_kernel in (False, True):
            ctx, _ = build_context(spans, [0] * n, kv, bs, torch.device("cpu"), use_kernel=use_kernel,
                                   tallies=slots if use_kernel else None)
            outs.append(paged_attention(q, k, v, kv.clone()[:, 0], ctx.attention, d_head ** -0.5))
        assert torch.isfinite(outs[0]).all() and torch.isfinite(outs[1]).all(), lens
        assert (outs[0] - outs[1]).abs().max().item() < 1e-5
    print("ok")
""")


def test_kernel_matches_portable_path():
    env = dict(os.environ, TRITON_INTERPRET="1")
    # ~150 s on the 2-core CPU machine; the limit leaves room for a CI machine twice as slow, inside pytest's 600
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=540,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_dependent_launches_only_where_the_device_has_them(monkeypatch):
    """The step kernels launch as programmatic dependents by default where the device and Triton have them
    (compute capability 9.0+, grid dependency control), plainly with DJINN_DEPENDENT_LAUNCH=0; asking for
    them elsewhere is an error, not a silent plain launch."""
    from djinn.kernels import dependent_launch

    for choice, expected in (("", dependent_launch.supported()), ("0", False)):
        monkeypatch.setattr(dependent_launch, "_enabled", None)
        monkeypatch.setenv(dependent_launch.ENV_VAR, choice)
        assert dependent_launch.enabled() == expected
        assert dependent_launch.options() == (
            {"DEPENDENT": True, "launch_pdl": True} if expected else {"DEPENDENT": False})
    monkeypatch.setattr(dependent_launch, "_enabled", None)
    monkeypatch.setenv(dependent_launch.ENV_VAR, "1")
    if dependent_launch.supported():
        assert dependent_launch.enabled()
    else:
        with pytest.raises(RuntimeError, match="compute capability 9.0"):
            dependent_launch.enabled()

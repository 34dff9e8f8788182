"""Times the Triton paged attention over its settings for the shapes the benchmarks run (decode at batch 1
and 64, a 512-token prefill), to pick the defaults in djinn/kernels/paged_attention.py. Calls are timed
inside a CUDA graph, as decode steps run them, so the figures are GPU time without launch overhead. Prints
one line per chunk and tile size, then those ranked by decode time (prefill as the tie-break), then
prompts with their tokens taken 1, 2, 4, ... 32 at a time (the prompt kernel's query tile) and over the
prompt kernel's programs, each checked bit for bit against one token at a time (the decode kernel), then
decode batches over programs per token and chunks in flight per program, each checked bit for bit against
the defaults.

    python3 benchmarks/tune_attention.py             # everything
    python3 benchmarks/tune_attention.py --prompts   # only the prompts' query tiles and programs
    python3 benchmarks/tune_attention.py --defaults  # only the module's settings, timed on each shape
    python3 benchmarks/tune_attention.py --programs  # only decode batches' programs and chunks in flight
"""
import argparse
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
PROMPTS = {
    "gpt2 prefill 512": (12, 12, 64, torch.float16, list(range(512)), 1, 1024),
    "mistral prefill 512": (32, 8, 128, torch.bfloat16, list(range(512)), 1, 4096),
    "mistral prefill 2048": (32, 8, 128, torch.bfloat16, list(range(2048)), 1, 4096),
    "mistral 4 prompts of 128": (32, 8, 128, torch.bfloat16, list(range(128)), 4, 4096),
    "qwen2-7b shape (7 heads a KV head) prefill 512": (28, 4, 128, torch.bfloat16, list(range(512)), 1, 4096),
}


def case(h, kvh, d, dtype, qpos, n_rows, max_context, query_tile=1):
    ctx = max(qpos) + 1
    per_row = -(-ctx // BS)
    kv = torch.randn(n_rows * per_row, 2, BS, kvh, d, device="cuda", dtype=dtype)
    tables = torch.randperm(n_rows * per_row, device="cuda").view(n_rows, per_row).int()
    n = n_rows * len(qpos)
    q = torch.randn(n, h, d, device="cuda", dtype=dtype)
    rows = torch.arange(n_rows, device="cuda", dtype=torch.int32).repeat_interleave(len(qpos))
    pos = torch.tensor(qpos * n_rows, device="cuda", dtype=torch.int32)
    return lambda: pa.paged_attention_triton(q, kv, tables, rows, pos, d ** -0.5, 0, max_context, query_tile)


def gpu_us(f, calls: int = 10, replays: int = 20) -> float:
    f()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            f()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return sorted(times)[len(times) // 2]


def main() -> None:
    """Chunk and tile sizes (unlike the settings swept after them, they change a token's bits) at the module's
    programs and chunks in flight; then the prompts' tiles and the decode batches' programs."""
    cases = {name: case(*shape) for name, shape in SHAPES.items()}
    defaults = pa.CHUNK, pa.BLOCK_N
    results = {}
    for chunk, block_n in itertools.product((64, 128, 256), (32, 64)):
        if block_n > chunk:
            continue
        pa.CHUNK, pa.BLOCK_N = chunk, block_n
        key = f"chunk {chunk} block_n {block_n}"
        results[key] = [gpu_us(f) for f in cases.values()]
        print(key + ": " + ", ".join(f"{n} {t:.1f} us" for n, t in zip(cases, results[key])), flush=True)
    print("\nranked by decode time (" + ", ".join(cases) + "):")
    for key, t in sorted(results.items(), key=lambda kv: (sum(kv[1][:3]), kv[1][3])):
        print(f"{sum(t[:3]):7.1f} us decode  {key}  ({', '.join(f'{x:.1f}' for x in t)})")
    pa.CHUNK, pa.BLOCK_N = defaults
    prompts_query_tile()
    large_batch_programs()


def defaults_only() -> None:
    """Every shape at the module's settings."""
    for name, shape in SHAPES.items():
        print(f"{name}: {gpu_us(case(*shape)):.1f} us", flush=True)


def prompts_query_tile() -> None:
    """Prompts with a prompt's tokens taken 1, 2, ... at a time, at the module's other defaults; every tile's
    output against one token at a time, and the tile prefill_query_tile picks; then that tile over the
    prompt kernel's programs per (tile, KV head)."""
    print("\nprompts, tokens a program takes together (the query tile; * marks the default's pick):")
    for name, shape in PROMPTS.items():
        torch.manual_seed(0)
        one = case(*shape)()
        pick = pa.prefill_query_tile(shape[0], shape[1])
        for tile in (1, 2, 4, 8, 16, 32):
            torch.manual_seed(0)  # the same inputs as `one`
            f = case(*shape, query_tile=tile)
            got = f()
            rows = tile * triton.next_power_of_2(shape[0] // shape[1])
            print(f"  {name}, tile {tile}{' *' if tile == pick else ''} ({rows} query rows): {gpu_us(f):.1f} us "
                  f"(bit-identical to tile 1: {torch.equal(got, one)}; max difference "
                  f"{(got.float() - one.float()).abs().max().item():.2e})", flush=True)
        kept = pa.PROMPT_PROGRAMS
        try:
            for programs in (1, 2, 4, 8, 16):  # the picked tile over programs per (tile, KV head)
                pa.PROMPT_PROGRAMS = programs
                torch.manual_seed(0)
                f = case(*shape, query_tile=pick)
                print(f"  {name}, tile {pick}, PROMPT_PROGRAMS {programs}{' *' if programs == kept else ''}: "
                      f"{gpu_us(f):.1f} us (bit-identical to tile 1: {torch.equal(f(), one)})", flush=True)
        finally:
            pa.PROMPT_PROGRAMS = kept


LARGE_BATCHES = {
    "mistral decode 64 x 130": (32, 8, 128, torch.bfloat16, [129], 64, 4096),
    "mistral decode 64 x 260": (32, 8, 128, torch.bfloat16, [259], 64, 4096),
    "mistral decode 64 x 380": (32, 8, 128, torch.bfloat16, [379], 64, 4096),
    "mistral decode 128 x 260": (32, 8, 128, torch.bfloat16, [259], 128, 4096),
    "gpt2 decode 64 x 260": (12, 12, 64, torch.float16, [259], 64, 1024),
}


def large_batch_programs() -> None:
    """Decode batches past SMALL at the throughput benchmark's contexts (128-token prompts, 256 new tokens),
    where a token has 3 to 6 chunks, over PROGRAMS (per token and KV head) and CHUNK_STAGES (chunks in flight
    per program); then batch 1 over their small batches' twins. Each against the defaults' output bit for
    bit (a chunk's result must not depend on which program computes it, or how)."""
    kept = {k: getattr(pa, k) for k in ("PROGRAMS", "CHUNK_STAGES", "PROGRAMS_SMALL", "CHUNK_STAGES_SMALL")}
    small = {k: v for k, v in SHAPES.items() if "decode 1 x" in k}
    for label, shapes, (key, stage_key), counts in (
            ("large", LARGE_BATCHES, ("PROGRAMS", "CHUNK_STAGES"), (1, 2, 4, 8)),
            ("small", small, ("PROGRAMS_SMALL", "CHUNK_STAGES_SMALL"), (8, 16))):
        print(f"\n{label} batches (defaults {kept}):", flush=True)
        times: dict[tuple, list[float]] = {}
        try:
            for name, shape in shapes.items():
                for k, v in kept.items():  # the reference at the defaults
                    setattr(pa, k, v)
                torch.manual_seed(0)
                ref = case(*shape)()
                for programs, stages in itertools.product(counts, (1, 2, 3, 4)):
                    setattr(pa, key, programs)
                    setattr(pa, stage_key, stages)
                    torch.manual_seed(0)  # the same inputs as `ref`
                    f = case(*shape)
                    same = torch.equal(f(), ref)
                    t = gpu_us(f)
                    print(f"  {name}, {key} {programs}, {stage_key} {stages}: {t:.1f} us "
                          f"(bit-identical to the defaults: {same})", flush=True)
                    times.setdefault((programs, stages, same), []).append(t)
        finally:
            for k, v in kept.items():
                setattr(pa, k, v)
        print(f"{label} batches' bit-identical settings by their summed time:")
        for (programs, stages, same), ts in sorted(times.items(), key=lambda kv: sum(kv[1])):
            if same and len(ts) == len(shapes):
                print(f"  {sum(ts):7.1f} us  {key} {programs}, {stage_key} {stages}  "
                      f"({', '.join(f'{t:.1f}' for t in ts)})")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", action="store_true", help="only the prompts' query tiles and programs")
    ap.add_argument("--defaults", action="store_true", help="only the module's settings, on the decode shapes")
    ap.add_argument("--programs", action="store_true", help="only decode batches' programs and chunks in flight")
    args = ap.parse_args()
    if args.prompts:
        prompts_query_tile()
    elif args.programs:
        large_batch_programs()
    elif args.defaults:
        defaults_only()
    else:
        main()

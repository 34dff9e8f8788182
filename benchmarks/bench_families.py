"""The families at realistic shapes on the GPU (random weights, bfloat16), each against transformers on the
same tensors:

    python3 benchmarks/bench_families.py --families gemma2-9b,qwen3-8b,pythia-6.9b,mixtral-8x7b-4l

Per family: parity of the prompt's logits with transformers (bfloat16: max and mean |diff|, top-1 agreement);
a Steer against the same edit by a forward hook; generation with a breakpoint resumed unchanged (tokens and
logits bit-identical to an uninterrupted run); batch-1 decode against the bandwidth floor (the weights a step
reads, a Mixtral step only its tokens' experts, plus the KV cache, over the measured copy bandwidth); and 64
sessions' tokens/s against their floor. Mixtral-8x7B does not fit one card twice over (transformers' copy
and Djinn's): a 4-layer slice of it runs instead. Writes bench_families.json into $OUT.
"""
from __future__ import annotations

import argparse
import subprocess
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import djinn  # noqa: E402
from djinn.models.loading import LoadedModel, _materialize, _to_djinn_state, config_from_hf  # noqa: E402
from benchmarks.bench import (DEV, batch1_ms_per_token, copy_bandwidth, kv_bytes_per_token, med,  # noqa: E402
                              step_weight_bytes, throughput_engine_sinks)

PROMPT_LEN, STEER_LAYER = 64, 2


def hf_config(name: str):
    import transformers as t

    common = dict(max_position_embeddings=4096, tie_word_embeddings=False)
    if name == "gemma2-9b":
        return t.Gemma2Config(vocab_size=256000, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                              num_attention_heads=16, num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256,
                              sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                              **{**common, "tie_word_embeddings": True})
    if name == "gemma3-4b":
        return t.Gemma3TextConfig(vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                                  num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                                  query_pre_attn_scalar=256, sliding_window=1024,
                                  **{**common, "tie_word_embeddings": True})
    if name == "qwen3-8b":
        return t.Qwen3Config(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                             num_attention_heads=32, num_key_value_heads=8, head_dim=128, **common)
    if name == "pythia-6.9b":
        return t.GPTNeoXConfig(vocab_size=50432, hidden_size=4096, intermediate_size=16384, num_hidden_layers=32,
                               num_attention_heads=32, use_parallel_residual=True, **common)
    if name == "phi3-mini":
        return t.Phi3Config(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=32, sliding_window=2047, **common)
    if name == "olmo2-7b":
        return t.Olmo2Config(vocab_size=100352, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=32, **common)
    if name == "mixtral-8x7b-4l":
        return t.MixtralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=4,
                               num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                               num_experts_per_tok=2, **common)
    raise ValueError(name)


def build(name: str):
    """transformers' model with random weights on the GPU, and Djinn's model of the same tensors."""
    import transformers

    hf_cfg = hf_config(name)
    hf_cfg._attn_implementation = "eager"
    # built on the GPU itself: a model emptied from the meta device keeps garbage in its non-persistent
    # buffers (rope frequencies, Gemma's embedding scale)
    with torch.device(DEV):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16)
    gen = torch.Generator(DEV).manual_seed(0)
    gemma = hf_cfg.model_type.startswith("gemma")
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() == 1:  # norm gains at one (Gemma's weights at zero: it scales by 1 + w), biases at zero
                p.fill_(0.0 if "bias" in pname or gemma else 1.0)
            else:  # by fan-in, so that the routers and the residual stream stay in a realistic range
                std = 0.02 if ("embed" in pname or "lm_head" in pname) else p.shape[-1] ** -0.5
                for rows in p.view(-1, p.shape[-1]).split(8192):
                    rows.copy_(torch.randn(rows.shape, generator=gen, device=DEV) * std)
    model.eval()
    cfg = config_from_hf(hf_cfg.to_dict())
    djinn_model = _materialize(cfg, _to_djinn_state(cfg, dict(model.state_dict())), torch.bfloat16, DEV)
    return model, LoadedModel(name, cfg, djinn_model, None)


def compare(got: torch.Tensor, want: torch.Tensor) -> dict:
    got, want = got.float(), want.float()
    diff = (got - want).abs()
    return {"max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(),
            "logit_scale": want.abs().max().item(),
            "top1_agreement": (got.argmax(-1) == want.argmax(-1)).float().mean().item()}


@torch.no_grad()
def hf_logits(model, prompt: list[int], steer=None) -> torch.Tensor:
    layers = model.gpt_neox.layers if hasattr(model, "gpt_neox") else model.model.layers
    handle = None
    if steer is not None:
        handle = layers[STEER_LAYER].register_forward_hook(
            lambda m, a, o: ((o[0] + steer,) + tuple(o[1:])) if isinstance(o, tuple) else o + steer)
    try:
        return model(torch.tensor([prompt], device=DEV), use_cache=False).logits[0]
    finally:
        if handle is not None:
            handle.remove()


def unmodified_pause_is_bit_identical(client, n_new=16) -> bool:
    prompt = list(range(100, 100 + PROMPT_LEN))
    plain = client.session().generate(prompt, max_new_tokens=n_new, stop_tokens=[], return_logits=True)
    site = f"blocks.{client.models()[0].n_layers // 2}.hook_resid_post"
    out = None
    for ev in client.session().stream(prompt, max_new_tokens=n_new, stop_tokens=[], return_logits=True,
                                      breakpoints=[djinn.Breakpoint(site, steps=[0, 3, 9])]):
        if isinstance(ev, djinn.Paused):
            ev.resume()
        elif isinstance(ev, djinn.Done):
            out = ev.result
    return out.token_ids == plain.token_ids and torch.equal(out.logits, plain.logits)


def softcap_kernel_check() -> dict:
    """The Triton kernel's soft-capped attention (prompt and one-token steps) against the portable path on
    this GPU: max |diff| of z from the portable path in float32 (and the portable path's own in bfloat16),
    soft-cap 2 (binding at these scores), a window of 5 and none."""
    from djinn.engine.batch import RowSpan, build_context
    from djinn.models.attention import paged_attention

    g = torch.Generator(DEV).manual_seed(0)
    out = {}
    for lens, window in (((7, 1, 4, 3), 0), ((1, 1, 1, 1), 5), ((7, 1, 4, 3), 5)):
        starts, bs, h, kvh, dh = (0, 5, 9, 2), 16, 8, 2, 128
        spans = [RowSpan(s, n, [1 + i]) for i, (s, n) in enumerate(zip(starts, lens))]
        n = sum(lens)
        kv = torch.randn(6, 1, 2, bs, kvh, dh, generator=g, device=DEV, dtype=torch.bfloat16)
        q = torch.randn(n, h, dh, generator=g, device=DEV, dtype=torch.bfloat16) * 3
        k, v = (torch.randn(n, kvh, dh, generator=g, device=DEV, dtype=torch.bfloat16) for _ in range(2))
        zs = []
        for use_kernel, dtype in ((True, torch.bfloat16), (False, torch.bfloat16), (False, torch.float32)):
            ctx, _ = build_context(spans, [0] * n, kv, bs, DEV, use_kernel=use_kernel)
            cache = kv.to(dtype, copy=True)[:, 0]
            zs.append(paged_attention(q.to(dtype), k.to(dtype), v.to(dtype), cache, ctx.attention, dh ** -0.5,
                                      window=window, softcap=2.0).float())
        out[f"lens{lens}_window{window}"] = {"kernel_vs_float32": (zs[0] - zs[2]).abs().max().item(),
                                             "portable_bf16_vs_float32": (zs[1] - zs[2]).abs().max().item()}
    return out


def family(name: str, bw: float) -> dict:
    t0 = time.perf_counter()
    hf, loaded = build(name)
    c = loaded.config
    out = {"family": name, "arch": c.arch, "n_layers": c.n_layers, "build_s": time.perf_counter() - t0}
    prompt = list(range(100, 100 + PROMPT_LEN))
    want = hf_logits(hf, prompt).cpu()
    steer = torch.randn(c.d_model, generator=torch.Generator().manual_seed(1)) * 0.5
    want_steered = hf_logits(hf, prompt, steer.to(DEV, torch.bfloat16)).cpu()
    del hf
    torch.cuda.empty_cache()
    client = djinn.connect(model=loaded, kv_memory=12 << 30)
    try:
        measure(client, loaded, bw, prompt, want, want_steered, steer, out)
    finally:
        client.close()
    out["total_s"] = time.perf_counter() - t0
    return out


def measure(client, loaded: LoadedModel, bw: float, prompt, want, want_steered, steer, out: dict) -> None:
    c = loaded.config
    s = client.session()
    out["prompt_logits_vs_transformers"] = compare(s.generate(prompt, max_new_tokens=0, return_logits="all").logits,
                                                   want)
    got_steered = client.session().generate(prompt, max_new_tokens=0, return_logits="all", interventions=[
        djinn.Steer(f"blocks.{STEER_LAYER}.hook_resid_post", steer)]).logits
    out["steer_vs_forward_hook"] = compare(got_steered, want_steered)
    out["steer_changed_logits_by"] = (got_steered.float() - want.float()).abs().max().item()
    out["unmodified_pause_bit_identical"] = unmodified_pause_is_bit_identical(client)
    # batch-1 decode against the bytes a step must read: a Mixtral token reads k of its n experts
    wbytes = step_weight_bytes(loaded.model)
    expert_bytes = sum(p.numel() * p.element_size() for n, p in loaded.model.named_parameters() if ".mlp.in_proj" in n
                       and p.dim() == 3 or ".mlp.down_proj" in n and p.dim() == 3)
    read1 = wbytes - expert_bytes * (1 - c.experts_per_token / c.n_experts) if c.n_experts else wbytes
    batch1_ms_per_token(client, n_new=8, trials=1)  # warm-up: graphs captured
    ms = batch1_ms_per_token(client, n_new=128, trials=3)
    floor1 = (read1 + (16 + 64) * kv_bytes_per_token(c, torch.bfloat16)) / bw * 1000
    out["batch1"] = {"ms_per_token": ms, "floor_ms_per_token": floor1, "ratio_to_floor": ms / floor1,
                     "kernels": batch1_kernels(client)}
    n = 64
    throughput_engine_sinks(client, n, "plain", n_prompt=128, n_new=16)  # warm-up: the batch's graphs
    tps = med([throughput_engine_sinks(client, n, "plain", n_prompt=128, n_new=256)[0] for _ in range(2)])
    touched = 1 - (1 - c.experts_per_token / c.n_experts) ** n if c.n_experts else 1.0
    step_bytes = wbytes - expert_bytes * (1 - touched) + n * 256 * kv_bytes_per_token(c, torch.bfloat16)
    floor_tps = n / (step_bytes / bw)
    out["sessions_64"] = {"tokens_per_s": tps, "floor_tokens_per_s": floor_tps, "fraction_of_floor": tps / floor_tps}


def batch1_kernels(client, n_new: int = 32, top: int = 10) -> dict:
    """Where a batch-1 decode step's GPU time goes: the kernels of n_new steps under the PyTorch profiler
    (inside the graphs' replays too), per token, the largest first, and their sum against the wall time."""
    s = client.session()
    s.generate(list(range(100, 116)), max_new_tokens=1, stop_tokens=[])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        s.generate([], max_new_tokens=n_new, stop_tokens=[])
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - t) * 1e6 / n_new
    s.close()
    rows = sorted(((e.key, e.self_device_time_total / n_new, e.count / n_new) for e in prof.key_averages()
                   if e.self_device_time_total > 0), key=lambda r: -r[1])
    return {"wall_us_per_token": wall_us, "kernel_us_per_token": sum(r[1] for r in rows),
            "top": [{"kernel": k[:90], "us_per_token": us, "launches_per_token": n} for k, us, n in rows[:top]]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", default="gemma2-9b,qwen3-8b,pythia-6.9b,mixtral-8x7b-4l")
    ap.add_argument("--one", help="(internal) measure this family and print its row")
    ap.add_argument("--bandwidth", type=float, help="(internal) the copy bandwidth measured by the parent")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(family(args.one, args.bandwidth)), flush=True)
        return
    bw = copy_bandwidth()
    result = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "command": " ".join(["python3", "benchmarks/bench_families.py"] + sys.argv[1:]),
              "copy_bandwidth_GBps": bw / 1e9, "softcap_kernel_vs_portable_max_abs_diff": softcap_kernel_check(),
              "families": []}
    path = os.path.join(os.environ.get("OUT", "."), "bench_families.json")
    for name in args.families.split(","):
        # each family in a process of its own: the card holds two copies of one model, never of two
        proc = subprocess.run([sys.executable, __file__, "--one", name, "--bandwidth", str(bw)], capture_output=True,
                              text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        row = json.loads(lines[-1]) if proc.returncode == 0 and lines else \
            {"family": name, "error": f"exit {proc.returncode}", "stderr": proc.stderr[-3000:]}
        result["families"].append(row)
        print(json.dumps(row), flush=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()

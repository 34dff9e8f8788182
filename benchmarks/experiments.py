"""`benchmarks/bench.py --part experiments`: whole experiments in one call, against Hugging Face transformers
on the same weights in the same run.

- Harvesting: one middle layer's `hook_resid_post` of 4,096 prompts x 128 random tokens brought to host
  memory, on the GPT-2-small shape (float16) and a Llama-3-8B shape (bfloat16). Djinn: `client.run_iter`
  (embedded). transformers: a forward hook on that block copying its output to the host, at its best batch
  size (swept on the first 512 prompts), run whole, stopped after the block (the hook raises, as TransformerLens'
  `stop_at_layer` and NNsight's `.stop()` do), and with `output_hidden_states`. The 8B shape's figure is
  also given as a fraction of the card's dense bf16 peak for the forward FLOPs up to the captured block.
- Patching: GPT-2 shape, 16-token prompts, `blocks.{0..11}.hook_resid_pre` x 16 positions (192 patched runs)
  with a logit-difference metric: `djinn.patching.activation_patch` against the same sweep through
  transformers hooks, batched (one forward of 16 patched prompts per layer) and as a plain loop.
- First trial against warm trials: 32 steered prompts x 64 new tokens through `client.run` (GPT-2 shape), on
  a fresh engine, 4 trials.

TransformerLens 4.x (its bridge over the same transformers model, raw weights, no compatibility mode) is
measured where it is installed (on the device, from carried wheels: `.wheels/tl/README.txt`): harvesting
through `run_with_cache(names_filter=site, stop_at_layer=...)` at transformers' best batch, and the patching
sweep through `run_with_hooks`, batched as transformers'. The bridge wraps a copy of the transformers model
(booting it wraps the model's modules and forces its eager attention).
"""
from __future__ import annotations

import copy
import tempfile
import time

import torch

import djinn
import djinn.patching as patching
from djinn.models.config import ModelConfig

N_PROMPTS, N_TOKENS = 4096, 128
WINDOW = 1024  # prompts of a harvesting run in flight
DENSE_BF16_PEAK = {"H100": 989e12, "H200": 989e12}  # NVIDIA's dense (no sparsity) bf16 tensor-core figures
LLAMA3_8B = ModelConfig(family="llama", vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                        d_mlp=14336, max_seq_len=8192, rope_theta=500000.0, norm_eps=1e-5)


def now() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


class Stop(Exception):
    """Raised by a hook to end the forward after the captured block."""


def _blocks(model):
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


def hf_harvest(model, layer: int, prompts: torch.Tensor, batch: int, how: str) -> float:
    """Seconds to bring block `layer`'s output for every prompt to the host: `how` is "hook" (a forward hook,
    the whole forward), "hook_stop" (the hook ends the forward) or "hidden_states"."""
    kept = []

    def hook(mod, inp, out):
        kept.append((out[0] if isinstance(out, tuple) else out).cpu())
        if how == "hook_stop":
            raise Stop
    handle = _blocks(model)[layer].register_forward_hook(hook) if how != "hidden_states" else None
    t = now()
    with torch.inference_mode():
        for lo in range(0, len(prompts), batch):
            ids = prompts[lo:lo + batch].to(model.device)
            try:
                if how == "hidden_states":
                    out = model(ids, output_hidden_states=True, use_cache=False)
                    kept.append(out.hidden_states[layer + 1].cpu())
                else:
                    model(ids, use_cache=False)
            except Stop:
                pass
    elapsed = now() - t
    if handle is not None:
        handle.remove()
    assert sum(k.shape[0] for k in kept) == len(prompts)
    return elapsed


def tl_bridge(hf):
    """TransformerLens 4.x's bridge over the transformers model `hf`, or None where it is not installed."""
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:
        return None
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    hf = copy.deepcopy(hf)  # booting changes the model it wraps: the transformers rows keep theirs as it was
    folder = tempfile.mkdtemp()  # the bridge reads the config from a folder; the model and tokenizer are given
    hf.config.save_pretrained(folder)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]")))
    return TransformerBridge.boot_transformers(folder, hf_model=hf, tokenizer=tokenizer, device=hf.device,
                                               dtype=hf.dtype)


def tl_harvest(bridge, site: str, layer: int, prompts: torch.Tensor, batch: int) -> float:
    """Seconds to bring `site` for every prompt to the host through `run_with_cache`, stopped after its block."""
    kept = []
    t = now()
    with torch.inference_mode():
        for lo in range(0, len(prompts), batch):
            _, cache = bridge.run_with_cache(prompts[lo:lo + batch].to(bridge.cfg.device), names_filter=site,
                                             stop_at_layer=layer + 1, return_cache_object=False)
            kept.append(cache[site].cpu())
    elapsed = now() - t
    assert sum(k.shape[0] for k in kept) == len(prompts)
    return elapsed


def djinn_harvest(client, site: str, prompts: torch.Tensor, window: int) -> float:
    t, n = now(), 0
    for out in client.run_iter((p.tolist() for p in prompts), window=window, interventions=[djinn.Capture(site)]):
        n += out.captures[(site, 0)].shape[0]
    elapsed = now() - t
    assert n == prompts.numel()
    return elapsed


def forward_flops(cfg: ModelConfig, layers: int, tokens: int, length: int) -> float:
    """Matmul FLOPs of the forward through `layers` blocks for `tokens` tokens in prompts of `length`."""
    d, kv = cfg.d_model, cfg.n_kv_heads * cfg.d_head
    weights = d * d * 2 + d * kv * 2 + d * cfg.d_mlp * (3 if cfg.family == "llama" else 2)
    attention = 4 * d * (length + 1) / 2  # q.k and p.v over the causal half of the keys, per token
    return layers * tokens * (2 * weights + attention)


def part_harvest(shape_name: str, hf, loaded, trials: int = 3) -> dict:
    cfg = loaded.config
    layer = cfg.n_layers // 2 - 1
    site = f"blocks.{layer}.hook_resid_post"
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, cfg.vocab_size, (N_PROMPTS, N_TOKENS), generator=g)
    out = {"shape": shape_name, "site": site, "prompts": N_PROMPTS, "tokens_per_prompt": N_TOKENS}
    sweep = {}
    for batch in (16, 32, 64, 128):
        try:
            hf_harvest(hf, layer, prompts[:batch], batch, "hook_stop")
            sweep[batch] = hf_harvest(hf, layer, prompts[:512], batch, "hook_stop")
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
    best = min(sweep, key=sweep.get)
    out["hf_batch_sweep_s_for_512"] = sweep
    out["hf_best_batch"] = best
    djinn_sweep = {}
    for step_tokens in (4096, 16384):  # Djinn's batch size: the tokens of one engine step
        client = djinn.connect(model=loaded, kv_memory=12 << 30, max_step_tokens=step_tokens)
        djinn_harvest(client, site, prompts[:512], WINDOW)  # warm-up
        djinn_sweep[step_tokens] = djinn_harvest(client, site, prompts[:1024], WINDOW)
        client.close()
    step_tokens = min(djinn_sweep, key=djinn_sweep.get)
    out["djinn_step_tokens_sweep_s_for_1024"] = djinn_sweep
    out["djinn_best_step_tokens"] = step_tokens
    client = djinn.connect(model=loaded, kv_memory=12 << 30, max_step_tokens=step_tokens)
    djinn_harvest(client, site, prompts[:512], WINDOW)  # warm-up
    rows = {"djinn_run_iter": [], "hf_hook": [], "hf_hook_stop": [], "hf_hidden_states": []}
    batches = {"hook": best, "hook_stop": best, "hidden_states": best}
    for _ in range(trials):  # the tools take turns, so a slow stretch of the card hits them alike
        rows["djinn_run_iter"].append(djinn_harvest(client, site, prompts, WINDOW))
        for how in batches:
            while True:  # the whole forward's logits may not fit at the best batch: halve it until they do
                try:
                    rows[f"hf_{how}"].append(hf_harvest(hf, layer, prompts, batches[how], how))
                    break
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    batches[how] //= 2
    client.close()
    bridge = tl_bridge(hf)
    if bridge is not None:
        tl_harvest(bridge, site, layer, prompts[:best], best)  # warm-up
        rows["tl_run_with_cache"] = [tl_harvest(bridge, site, layer, prompts, best) for _ in range(trials)]
        out["tl_value_max_abs_diff_vs_djinn"] = tl_value_check(bridge, loaded, site, layer, prompts[:4])
        del bridge
        torch.cuda.empty_cache()
    out["transformer_lens"] = "measured" if bridge is not None else "not installed"
    out["hf_batch_used"] = batches
    tokens = N_PROMPTS * N_TOKENS
    out["seconds"] = {k: v for k, v in rows.items()}
    out["tokens_per_s"] = {k: tokens / sorted(v)[len(v) // 2] for k, v in rows.items() if v}
    flops = forward_flops(cfg, layer + 1, tokens, N_TOKENS)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    card = next((k for k in DENSE_BF16_PEAK if k in name), None)
    out["forward_flops_to_site"] = flops
    if card is not None:
        out["dense_bf16_peak"] = DENSE_BF16_PEAK[card]
        out["fraction_of_peak"] = {k: flops * tps / tokens / DENSE_BF16_PEAK[card]
                                   for k, tps in out["tokens_per_s"].items()}
    return out


def tl_value_check(bridge, loaded, site: str, layer: int, prompts: torch.Tensor) -> float:
    """The bridge's value at `site` against Djinn's for the same prompts."""
    with torch.inference_mode():
        _, cache = bridge.run_with_cache(prompts.to(bridge.cfg.device), names_filter=site, stop_at_layer=layer + 1,
                                         return_cache_object=False)
    client = djinn.connect(model=loaded, kv_memory=2 << 30)
    res = client.run([p.tolist() for p in prompts], interventions=[djinn.Capture(site)])
    client.close()
    return max((cache[site][i].float().cpu() - r.captures[(site, 0)].float()).abs().max().item()
               for i, r in enumerate(res))


def tl_patch_sweep(bridge, clean: torch.Tensor, corrupted: torch.Tensor, good: int, bad: int) -> torch.Tensor:
    """The resid_pre patching grid through TransformerLens: the clean run's cache, then per layer one
    `run_with_hooks` of 16 patched copies of the corrupted prompt (row p patched at position p)."""
    n_layers, T = bridge.cfg.n_layers, len(clean)
    names = [f"blocks.{i}.hook_resid_pre" for i in range(n_layers)]
    dev = bridge.cfg.device
    with torch.inference_mode():
        _, cache = bridge.run_with_cache(clean[None].to(dev), names_filter=names, return_cache_object=False)
        grid = torch.empty(n_layers, T)
        for i, name in enumerate(names):
            def patch(act, hook, i=i):
                act = act.clone()
                rows = torch.arange(T, device=act.device)
                act[rows, rows] = cache[names[i]][0]
                return act
            logits = bridge.run_with_hooks(corrupted[None].expand(T, T).to(dev), fwd_hooks=[(name, patch)])
            last = logits[:, -1].float()
            grid[i] = (last[:, good] - last[:, bad]).cpu()
    return grid


def hf_patch_sweep(model, clean: torch.Tensor, corrupted: torch.Tensor, good: int, bad: int,
                   batched: bool) -> torch.Tensor:
    """The resid_pre patching grid through transformers hooks: the clean run's block inputs captured by
    pre-hooks, then per layer the corrupted prompt patched at each position (16 in one batch, or one at a time)."""
    blocks, T = _blocks(model), len(clean)
    clean_in = {}
    handles = [b.register_forward_pre_hook(lambda mod, args, kw, i=i: clean_in.__setitem__(i, args[0] if args
                                                                                           else kw["hidden_states"]),
                                           with_kwargs=True) for i, b in enumerate(blocks)]
    with torch.inference_mode():
        model(clean[None].to(model.device), use_cache=False)
        for h in handles:
            h.remove()
        grid = torch.empty(len(blocks), T)
        for i, b in enumerate(blocks):
            cells = [list(range(T))] if batched else [[p] for p in range(T)]
            for positions in cells:
                def patch(mod, args, kw, positions=positions):
                    h = (args[0] if args else kw["hidden_states"]).clone()
                    for row, p in enumerate(positions):
                        h[row, p] = clean_in[i][0, p]
                    return ((h,) + tuple(args[1:]), kw) if args else (args, {**kw, "hidden_states": h})
                handle = b.register_forward_pre_hook(patch, with_kwargs=True)
                ids = corrupted[None].expand(len(positions), T).to(model.device)
                logits = model(ids, use_cache=False).logits[:, -1].float()
                handle.remove()
                grid[i, positions] = (logits[:, good] - logits[:, bad]).cpu()
    return grid


def part_patching(hf, loaded, trials: int = 5) -> dict:
    cfg = loaded.config
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(100, cfg.vocab_size, (16,), generator=g)
    corrupted = clean.clone()
    corrupted[[3, 9]] = torch.randint(100, cfg.vocab_size, (2,), generator=g)
    good, bad = 1000, 2000
    metric = patching.logit_diff(good, bad)
    client = djinn.connect(model=loaded, kv_memory=4 << 30)
    sites = [f"blocks.{i}.hook_resid_pre" for i in range(cfg.n_layers)]

    def djinn_sweep():
        return patching.activation_patch(client, clean.tolist(), corrupted.tolist(), sites=sites, metric=metric)
    grids = {"djinn": djinn_sweep(), "hf_batched": hf_patch_sweep(hf, clean, corrupted, good, bad, True)}
    # the same cells by hand through Djinn sessions (a Replace each), for the first and last layers
    (ref,) = client.run([clean.tolist()], interventions=[djinn.Capture(s) for s in sites])
    by_hand = torch.full_like(grids["djinn"], float("nan"))
    for i in (0, cfg.n_layers - 1):
        for p in range(16):
            row = ref.captures[(sites[i], 0)][p]
            with client.session() as s:
                o = s.generate(corrupted.tolist(), max_new_tokens=1, return_logits=True, stop_tokens=[],
                               interventions=[djinn.Replace(sites[i], row, positions=[p], steps=[0])])
            by_hand[i, p] = metric(o.logits[0])
    times = {"djinn": [], "hf_batched": [], "hf_loop": []}
    for _ in range(trials):
        t = now()
        djinn_sweep()
        times["djinn"].append(now() - t)
        t = now()
        hf_patch_sweep(hf, clean, corrupted, good, bad, True)
        times["hf_batched"].append(now() - t)
        t = now()
        grids["hf_loop"] = hf_patch_sweep(hf, clean, corrupted, good, bad, False)
        times["hf_loop"].append(now() - t)
    bridge = tl_bridge(hf)
    if bridge is not None:
        grids["tl_batched"] = tl_patch_sweep(bridge, clean, corrupted, good, bad)
        times["tl_batched"] = []
        for _ in range(trials):
            t = now()
            tl_patch_sweep(bridge, clean, corrupted, good, bad)
            times["tl_batched"].append(now() - t)
    baselines = {"djinn_clean": patching.metric_of(client, clean.tolist(), metric),
                 "djinn_corrupted": patching.metric_of(client, corrupted.tolist(), metric)}
    # the batch alone, unpatched: every row's logits against a lone run's
    alone = client.run([corrupted.tolist()], max_new_tokens=1, return_logits=True, stop_tokens=[])[0].logits[0]
    batch = client.run([corrupted.tolist()] * (cfg.n_layers * 16), max_new_tokens=1, return_logits=True,
                       stop_tokens=[])
    baselines["unpatched_batch_max_abs_logit_diff_vs_alone"] = max((r.logits[0] - alone).abs().max().item()
                                                                   for r in batch)
    client.close()
    medians = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    scale = grids["hf_batched"].abs().max().item()
    return {"cells": [cfg.n_layers, 16], "seconds": times, "median_s": medians,
            "djinn_speedup": {k: medians[k] / medians["djinn"] for k in medians if k != "djinn"},
            "max_abs_diff_djinn_vs_tl": ((grids["djinn"] - grids["tl_batched"]).abs().max().item()
                                         if "tl_batched" in grids else None),
            "max_abs_diff_djinn_vs_hf": (grids["djinn"] - grids["hf_batched"]).abs().max().item(),
            "max_abs_diff_djinn_vs_djinn_by_hand": (grids["djinn"] - by_hand).nan_to_num().abs().max().item(),
            "metric_scale": scale, "baselines": baselines,
            "grids": {k: v.tolist() for k, v in grids.items()}, "djinn_by_hand_first_last_layer": by_hand.tolist()}


def part_first_trial(loaded, trials: int = 4) -> dict:
    """A fresh engine's first batched steered run against its later ones (graphs for new batch shapes)."""
    cfg = loaded.config
    client = djinn.connect(model=loaded, kv_memory=4 << 30)
    steer = djinn.Steer(f"blocks.{cfg.n_layers // 2}.hook_resid_post", torch.full((cfg.d_model,), 0.01))
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(100, cfg.vocab_size, (16 + i,), generator=g).tolist() for i in range(32)]
    times = []
    for _ in range(trials):
        t = now()
        client.run(prompts, max_new_tokens=64, interventions=[steer], stop_tokens=[])
        times.append(now() - t)
    client.close()
    warm = sorted(times[1:])[len(times[1:]) // 2]
    return {"seconds": times, "first_over_warm": times[0] / warm}

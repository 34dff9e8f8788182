"""The GPU benchmark: the seed experiment, decode latency and throughput, and baselines, in one run.

    python3 benchmarks/bench.py --part gpt2        # (a) seed experiment + batch-1 decode + HF eager, GPT-2-small shape
    python3 benchmarks/bench.py --part mistral     # (b) the same on a Mistral-7B shape + HF eager
    python3 benchmarks/bench.py --part throughput  # (c) Mistral-7B shape, 1..128 sessions: plain, Steer, 25% pausing
                                                   #     (medians of 3 trials, the modes taking turns; also
                                                   #     the tokens/s of the sessions that never pause),
                                                   #     each with one client thread per session and with no
                                                   #     client threads (events to sinks on the engine thread)
    python3 benchmarks/bench.py --part throughput --sessions 64 --trials 3   # some session counts only
    python3 benchmarks/bench.py --part experiments [--shapes gpt2,llama3-8b]  # (d) harvesting, patching and
                                                   #     first-trial figures against transformers (experiments.py)

Each part runs in under 10 minutes on an H200, writes JSON into the folder named by the OUT environment
variable (default: the current folder) and prints, last, a table of its figures beside the targets
(benchmarks/bench_report.py, which also renders saved results). The seed experiment runs embedded and over
loopback WebSocket to a server process of its own (the server's packages must be importable on the GPU
machine; see benchmarks/results/README.md).
All weights are random (seeded); every figure is a median over the stated trials, measured in this run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from typing import Callable, Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import djinn  # noqa: E402
from djinn.engine.engine import Engine  # noqa: E402
from djinn.models.config import ModelConfig  # noqa: E402
from djinn.models.loading import LoadedModel, _materialize, _to_djinn_state  # noqa: E402
from benchmarks.bench_report import report  # noqa: E402
from benchmarks.experiments import LLAMA3_8B, part_first_trial, part_harvest, part_patching  # noqa: E402
from benchmarks.engine_stamps import STAMPS, dump_on_sigterm, load, paused_to_client_ms, served, stamp_engine  # noqa: E402

SHAPES = {
    "gpt2": dict(cfg=ModelConfig(family="gpt2", vocab_size=50257, d_model=768, n_layers=12, n_heads=12,
                                 n_kv_heads=12, d_mlp=3072, max_seq_len=1024, tie_embeddings=True),
                 dtype=torch.float16, layers=(3, 6, 9)),
    "mistral": dict(cfg=ModelConfig(family="llama", vocab_size=32000, d_model=4096, n_layers=32, n_heads=32,
                                    n_kv_heads=8, d_mlp=14336, max_seq_len=4096, rope_theta=10000.0,
                                    sliding_window=4096, norm_eps=1e-5),
                    dtype=torch.bfloat16, layers=(8, 16, 24)),
    "llama3-8b": dict(cfg=LLAMA3_8B, dtype=torch.bfloat16, layers=(8, 16, 24)),
}
DEV = torch.device("cuda")


def med(xs):
    return statistics.median(xs)


def now():
    torch.cuda.synchronize()
    return time.perf_counter()


# ---------------------------------------------------------------- models: one set of weights for both engines

def hf_model(shape: str):
    """A random Hugging Face model on the GPU; Djinn loads the very same tensors."""
    import transformers

    spec = SHAPES[shape]
    c, dtype = spec["cfg"], spec["dtype"]
    if c.family == "gpt2":
        hf_cfg = transformers.GPT2Config(vocab_size=c.vocab_size, n_embd=c.d_model, n_layer=c.n_layers,
                                         n_head=c.n_heads, n_positions=c.max_seq_len)
        cls = transformers.GPT2LMHeadModel
    else:
        hf_cfg = transformers.MistralConfig(vocab_size=c.vocab_size, hidden_size=c.d_model,
                                            num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
                                            num_key_value_heads=c.n_kv_heads, intermediate_size=c.d_mlp,
                                            max_position_embeddings=c.max_seq_len, sliding_window=c.sliding_window,
                                            rope_theta=c.rope_theta, rms_norm_eps=c.norm_eps)
        cls = transformers.MistralForCausalLM
    hf_cfg._attn_implementation = "eager"
    with torch.device("meta"):
        model = cls(hf_cfg)
    model = model.to_empty(device=DEV).to(dtype)
    gen = torch.Generator(DEV).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0 if "bias" not in name else 0.0)
            else:
                for rows in p.split(4096):
                    rows.copy_(torch.randn(rows.shape, generator=gen, device=DEV) * 0.02)
    if c.tie_embeddings:  # built on the meta device and emptied, the head is no longer the embedding's
        model.lm_head.weight = model.get_input_embeddings().weight
    model.eval()
    if hasattr(model, "model") and hasattr(model.model, "rotary_emb"):  # to_empty left its tables uninitialised
        model.model.rotary_emb = type(model.model.rotary_emb)(config=hf_cfg, device=DEV)
    state = _to_djinn_state(c, {k: v for k, v in model.state_dict().items()})
    djinn_model = _materialize(c, state, dtype, DEV)
    return model, LoadedModel(f"{shape}-random", c, djinn_model, None)


def weight_bytes(m: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in m.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def step_weight_bytes(m: torch.nn.Module) -> int:
    """Weight bytes a decode step must read: every parameter but the embedding tables, of which a step reads
    one row per token (a table tied to the output head is read whole there, so it stays)."""
    lookups = [e.weight for e in m.modules() if isinstance(e, torch.nn.Embedding) and e.weight is not m.lm_head.weight]
    return weight_bytes(m) - sum(w.numel() * w.element_size() for w in lookups)


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (median of 20 after warm-up)."""
    x = torch.randn(1 << 30, device=DEV, dtype=torch.float16)  # 2 GiB
    y = torch.empty_like(x)
    times = []
    for i in range(25):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        y.copy_(x)
        e.record()
        e.synchronize()
        if i >= 5:
            times.append(s.elapsed_time(e) / 1000)
    del x, y
    torch.cuda.empty_cache()
    return 2 * (1 << 30) * 2 / med(times)


def kv_bytes_per_token(c: ModelConfig, dtype) -> int:
    return c.n_layers * 2 * c.n_kv_heads * c.d_head * torch.empty((), dtype=dtype).element_size()


# ---------------------------------------------------------------- measurements

def generate_tokens(session, prompt: list[int], n: int) -> None:
    session.generate(prompt, max_new_tokens=n, stop_tokens=[])


def batch1_ms_per_token(client, n_new=256, trials=3, run=generate_tokens) -> float:
    """ms per decoded token of one session: `run(session, prompt, n)` for n_new + 1 tokens, less its time for 1
    (the prompt's share)."""
    prompt = list(range(100, 116))
    out = []
    for _ in range(trials):
        s = client.session()
        t0 = now()
        run(s, prompt, 1)
        t1 = now()
        s2 = client.session()
        t2 = now()
        run(s2, prompt, n_new + 1)
        t3 = now()
        out.append(((t3 - t2) - (t1 - t0)) * 1000 / n_new)
        s.close()
        s2.close()
    return med(out)


def through_client(run: Callable = generate_tokens, trials: int = 1) -> Callable[[object, int, int], float]:
    """batch1_ms_per_token for `run(session, prompt, n)`, on a fresh embedded client, after a warm-up:
    `measure(loaded, kv_memory, n_new)`."""
    def measure(loaded, kv_memory: int, n_new: int) -> float:
        client = djinn.connect(model=loaded, kv_memory=kv_memory)
        batch1_ms_per_token(client, n_new=8, trials=1, run=run)  # warm-up: graphs captured
        ms = batch1_ms_per_token(client, n_new=n_new, trials=trials, run=run)
        client.close()
        return ms
    return measure


def step_ms(loaded, kv_memory: int = 2 << 30, steps: int = 200) -> float:
    """ms per `engine.step()` driven directly (no engine thread) for one decoding session: the GPU's and the
    graphs' share of a batch-1 token."""
    engine = Engine([loaded], kv_memory=kv_memory)
    sid = engine.create_session("x")
    engine.generate(sid, "x", list(range(100, 116)), lambda ev: None, max_new_tokens=steps + 200, stop_tokens=[])
    for _ in range(20):
        engine.step()
    t = now()
    for _ in range(steps):
        engine.step()
    return (now() - t) * 1000 / steps


def hf_ms_per_token(model, hook_layer=None, scale=1.0, n_new=64, trials=3) -> float:
    """HF eager decode with its KV cache; with `hook_layer`, a forward hook pauses there every step: reads the
    activation to the host, edits it, and writes it back (what a hook-based tool has to do)."""
    layers = model.transformer.h if hasattr(model, "transformer") else model.model.layers
    handle = None
    if hook_layer is not None:
        def hook(mod, inp, out):
            h = out[0] if isinstance(out, tuple) else out
            edited = (h.cpu() * scale).to(h.device)
            return (edited,) + tuple(out[1:]) if isinstance(out, tuple) else edited
        handle = layers[hook_layer].register_forward_hook(hook)
    ids = torch.arange(100, 116, device=DEV)[None]
    res = []
    try:
        with torch.no_grad():
            for _ in range(trials):
                out = model(ids, use_cache=True)
                past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
                t0 = now()
                for _ in range(n_new):
                    out = model(tok, past_key_values=past, use_cache=True)
                    past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
                res.append((now() - t0) * 1000 / n_new)
    finally:
        if handle:
            handle.remove()
    return med(res)


def hf_generate_ms_per_token(model, n_new=64, trials=3) -> float:
    """HF's own `generate()` loop (greedy, its KV cache), as users call it: per token, from a run of n_new + 1
    tokens minus a run of 1 (so the prompt's forward cancels out)."""
    ids = torch.arange(100, 116, device=DEV)[None]
    mask = torch.ones_like(ids)
    res = []

    def timed(n):
        t = now()
        model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=0)
        return now() - t
    with torch.no_grad():
        for _ in range(trials):
            res.append((timed(n_new + 1) - timed(1)) * 1000 / n_new)
    return med(res)


def pause_every_step_ms_per_token(client, layer: int, n_new=64, trials=3) -> float:
    """Djinn's white-box loop beside HF's hook: the session pauses at the layer at every step, the client gets
    the activation, multiplies it by 1.0 and resumes with it (what `hf_ms_per_token(hook_layer=...)` does)."""
    prompt, site = list(range(100, 116)), f"blocks.{layer}.hook_resid_post"
    res = []
    for _ in range(trials):
        t = now()
        run_stream(client.session(), prompt, 1, site=site, steps=[0], edit=lambda a: a * 1.0)
        t1 = now()
        run_stream(client.session(), prompt, n_new + 1, site=site, steps=range(n_new + 1), edit=lambda a: a * 1.0)
        res.append(((now() - t1) - (t1 - t)) * 1000 / n_new)
    return med(res)


def run_stream(session, prompt, n_new, site=None, steps=(0,), edit=None, **kw):
    """Stream one call; returns (tokens, per-pause [(t_paused_event, t_resume_call, t_next_token)])."""
    bps = [djinn.Breakpoint(site, steps=list(steps))] if site else []
    tokens, pauses, pending = [], [], None
    for ev in session.stream(prompt, max_new_tokens=n_new, breakpoints=bps, stop_tokens=[], **kw):
        t = time.perf_counter()
        if isinstance(ev, djinn.Paused):
            act = edit(ev.activation) if edit else None
            pending = [t, time.perf_counter()]
            ev.resume(act)
        elif isinstance(ev, djinn.Token):
            tokens.append(ev.token_id)
            if pending:
                pauses.append((*pending, t))
                pending = None
    return tokens, pauses


def add_pause_to_client(result: dict, engine_stamps: Optional[list]) -> None:
    """Each layer's time from the engine emitting a round trip's Paused event (the activation staged in host
    memory) to the client holding it, from the client's stamps and the engine's (None: no engine stamps)."""
    for x in result["layers"].values():
        seen = x.pop("paused_seen_at")
        x["pause_to_client_ms"] = None if engine_stamps is None else med(paused_to_client_ms(engine_stamps, seen))


def seed_experiment(client, shape: str, n_new=128, trials=3, rt_trials=15) -> dict:
    layers = SHAPES[shape]["layers"]
    prompt = torch.randint(0, SHAPES[shape]["cfg"].vocab_size, (512,), generator=torch.Generator().manual_seed(1)).tolist()
    base, _ = run_stream(client.session(), prompt, n_new)
    result = {"prompt_tokens": 512, "new_tokens": n_new, "trials": trials, "round_trip_trials": rt_trials,
              "layers": {}}
    for layer in layers:
        site = f"blocks.{layer}.hook_resid_post"
        agree, added, resume_lat, ck_dispatch, ck_copy, ck_gbps, restore_t, restore_agree = [], [], [], [], [], [], [], []
        seen = []  # when the client had each round trip's Paused event (matched to the engine's stamps later)
        for _ in range(rt_trials):
            # round trip: prefill alone, uninterrupted vs paused at the site and resumed unchanged at once
            plain, paused = client.session(), client.session()
            t0 = now(); run_stream(plain, prompt, 1); t1 = now()
            _, p = run_stream(paused, prompt, 1, site=site); t2 = now()
            added.append(((t2 - t1) - (t1 - t0)) * 1000)
            seen.append(p[0][0])
            resume_lat.append((p[0][2] - p[0][1]) * 1000)
            plain.close()
            paused.close()
        for _ in range(trials):
            s = client.session()
            toks, _ = run_stream(s, prompt, n_new, site=site, steps=(0, 64))
            agree.append(sum(a == b for a, b in zip(toks, base)) / len(base))
            t = time.perf_counter(); ck = s.checkpoint(); ck_dispatch.append((time.perf_counter() - t) * 1000)
            st = ck.wait()
            ck_copy.append(st["copy_seconds"] * 1000)
            ck_gbps.append(st["n_bytes"] / st["copy_seconds"] / 1e9)
            t = time.perf_counter(); r = ck.restore(); more, _ = run_stream(r, [], 8); restore_t.append((time.perf_counter() - t) * 1000)
            ref_more, _ = run_stream(s, [], 8)
            restore_agree.append(more == ref_more)
            for x in (s, r):
                x.close()
            ck.delete()
        result["layers"][layer] = {
            "token_agreement_unmodified": med(agree), "breakpoint_round_trip_added_ms": med(added),
            "resume_to_token_ms": med(resume_lat), "checkpoint_dispatch_ms": med(ck_dispatch),
            "checkpoint_copy_ms": med(ck_copy), "checkpoint_copy_GBps": med(ck_gbps),
            "restore_plus_8_tokens_ms": med(restore_t), "restore_continues_identically": all(restore_agree),
            "paused_seen_at": seen}
    mid = layers[1]
    steered, _ = run_stream(client.session(), prompt, n_new, site=f"blocks.{mid}.hook_resid_post",
                            steps=range(0, n_new + 1), edit=lambda a: a * 0.9)
    declarative = client.session().generate(prompt, max_new_tokens=n_new, stop_tokens=[], interventions=[
        djinn.Scale(f"blocks.{mid}.hook_resid_post", 0.9)]).token_ids
    result["steer_scale_0.9_changed_fraction"] = sum(a != b for a, b in zip(steered, base)) / n_new
    result["steer_interactive_equals_declarative"] = steered == declarative
    # another session's speed while one sits paused
    def tps(paused_other: bool) -> float:
        holder = None
        if paused_other:
            holder = client.session().stream(prompt, max_new_tokens=4, breakpoints=[
                djinn.Breakpoint(f"blocks.{mid}.hook_resid_post", steps=[0])])
            assert isinstance(next(holder), djinn.Paused)
        t = now(); run_stream(client.session(), prompt[:16], n_new); dt = now() - t
        if holder:
            holder.close()
        return n_new / dt
    runs = [(tps(False), tps(True)) for _ in range(trials)]  # taking turns, so a slow stretch hits both alike
    result["other_session_tokens_per_s_alone"] = med([a for a, _ in runs])
    result["other_session_tokens_per_s_while_one_paused"] = med([b for _, b in runs])
    result["other_session_trials"] = runs
    return result


def pauses(i: int) -> bool:
    """In the pause25 mode, whether session i is one of the quarter that pause."""
    return i % 4 == 0


def rates(tokens: list[int], start: float, finished: list[float]) -> tuple[float, Optional[float]]:
    """tokens/s of all sessions (until the last finished), and of the sessions that never pause in the pause25
    mode (until the last of them finished: what the sessions that keep running get; None with no such session).
    Every mode reports both, over the same sessions."""
    running = [i for i in range(len(tokens)) if not pauses(i)]
    total = sum(tokens) / (max(finished) - start)
    if not running:
        return total, None
    return total, sum(tokens[i] for i in running) / (max(finished[i] for i in running) - start)


def mode_options(client, n_sessions: int, mode: str, g: torch.Generator, n_new: int):
    """Per session i: (interventions, breakpoints) of a throughput mode. steer: a Steer on every session;
    pause25: every fourth session pauses once, halfway."""
    vec = torch.randn(client.models()[0].d_model, generator=g) * 0.1
    site = "blocks.16.hook_resid_post"
    steer = [djinn.Steer(site, vec)] if mode == "steer" else []
    return [(steer, [djinn.Breakpoint(site, steps=[n_new // 2])] if mode == "pause25" and pauses(i) else [])
            for i in range(n_sessions)]


def throughput_engine_sinks(client, n_sessions: int, mode: str, n_prompt=128, n_new=256) -> tuple:
    """The same load with no client threads: events go to sinks on the engine thread (the engine's own rate);
    a paused session is resumed from its sink, through the engine's command queue. Returns `rates`."""
    service = client._backend.service
    owner = client._backend.owner
    vocab = client.models()[0].vocab_size
    g = torch.Generator().manual_seed(n_sessions)
    done, ended = threading.Event(), [0]
    tokens, finished = [0] * n_sessions, [0.0] * n_sessions
    sids = [service.call("create_session", owner) for _ in range(n_sessions)]
    prompts = [torch.randint(0, vocab, (n_prompt,), generator=g).tolist() for _ in sids]
    options = mode_options(client, n_sessions, mode, g, n_new)

    def sink_for(i, sid):
        def sink(ev):
            if isinstance(ev, djinn.Token):
                tokens[i] += 1
            elif isinstance(ev, djinn.Paused):
                service.post("resume", sid, owner, None, ev.pause_id)
            elif isinstance(ev, (djinn.Done, djinn.Error)):
                finished[i] = time.perf_counter()
                ended[0] += 1
                if ended[0] == n_sessions:
                    done.set()
        return sink
    t = now()
    submitted = [service.post("generate", sid, owner, p, sink_for(i, sid), max_new_tokens=n_new, stop_tokens=[],
                              interventions=items, breakpoints=bps)
                 for i, (sid, p, (items, bps)) in enumerate(zip(sids, prompts, options))]  # queued together
    for f in submitted:
        f.result()
    done.wait()
    for sid in sids:
        service.call("close_session", sid, owner)
    assert tokens == [n_new] * n_sessions
    return rates(tokens, t, finished)


def stream_tokens(session, prompt: list[int], n_new: int, items: list, bps: list) -> int:
    """One session's call through stream(), each pause resumed unchanged: the tokens it received."""
    tokens = 0
    for ev in session.stream(prompt, max_new_tokens=n_new, breakpoints=bps, stop_tokens=[], interventions=items):
        if isinstance(ev, djinn.Paused):
            ev.resume()
        elif isinstance(ev, djinn.Token):
            tokens += 1
    return tokens


def throughput(client, n_sessions: int, mode: str, n_prompt=128, n_new=256, run=stream_tokens) -> tuple:
    """One client thread per session, as an embedded user with many sessions would run them, each making its
    call through `run` (default: streaming). Returns `rates`."""
    vocab = client.models()[0].vocab_size
    g = torch.Generator().manual_seed(n_sessions)
    prompts = [torch.randint(0, vocab, (n_prompt,), generator=g).tolist() for _ in range(n_sessions)]
    options = mode_options(client, n_sessions, mode, g, n_new)
    sessions = [client.session() for _ in range(n_sessions)]
    done, finished = [0] * n_sessions, [0.0] * n_sessions

    def work(i):
        done[i] = run(sessions[i], prompts[i], n_new, *options[i])
        finished[i] = time.perf_counter()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(n_sessions)]
    t = now()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for s in sessions:
        s.close()
    assert all(x == n_new for x in done)
    return rates(done, t, finished)


# ---------------------------------------------------------------- parts

def part_latency(shape: str) -> dict:
    stamp_engine()  # the embedded engine's Paused events, for the time to the client's hands
    spec = SHAPES[shape]
    bw = copy_bandwidth()
    hf, loaded = hf_model(shape)
    wbytes = step_weight_bytes(loaded.model)
    client = djinn.connect(model=loaded, kv_memory=16 << 30)
    out = {"shape": shape, "dtype": str(spec["dtype"]), "copy_bandwidth_GBps": bw / 1e9,
           "weight_bytes": weight_bytes(loaded.model), "weight_bytes_read_per_step": wbytes}
    out["djinn_batch1_ms_per_token"] = batch1_ms_per_token(client)
    ctx = 16 + 128  # mean context over the timed decode steps
    floor_bytes = wbytes + ctx * kv_bytes_per_token(spec["cfg"], spec["dtype"])
    out["floor_batch1_ms_per_token"] = floor_bytes / bw * 1000
    hf_ms_per_token(hf, n_new=8, trials=1)  # warm-up
    out["hf_eager_ms_per_token"] = hf_ms_per_token(hf)
    out["hf_eager_with_pause_hook_ms_per_token"] = hf_ms_per_token(hf, hook_layer=spec["layers"][1])
    out["hf_generate_ms_per_token"] = hf_generate_ms_per_token(hf)
    out["djinn_pause_every_step_ms_per_token"] = pause_every_step_ms_per_token(client, spec["layers"][1])
    out["seed_experiment"] = {"embedded": seed_experiment(client, shape)}
    add_pause_to_client(out["seed_experiment"]["embedded"], STAMPS)
    print(json.dumps(out, indent=2), flush=True)  # kept even if the server part below fails
    client.close()
    del hf, loaded
    torch.cuda.empty_cache()
    stamps_path = os.path.join(tempfile.mkdtemp(), "server_stamps.json")
    try:
        with served([os.path.abspath(__file__), "--serve", shape, "--stamps", stamps_path]) as url:
            remote = djinn.connect(url)
            out["seed_experiment"]["websocket"] = seed_experiment(remote, shape)
            remote.close()
        try:  # the server wrote its engine's stamps as it stopped
            server_stamps = load(stamps_path)
        except OSError as e:
            print(f"the server left no engine stamps ({e}): pause_to_client_ms is not measured", flush=True)
            server_stamps = None
        add_pause_to_client(out["seed_experiment"]["websocket"], server_stamps)
    except (ImportError, RuntimeError) as e:  # the server's packages are missing here, or it did not start
        out["seed_experiment"]["websocket"] = f"not run: {e}"
    return out


def part_experiments(shapes: list[str]) -> dict:
    """Harvesting on each shape; on the GPT-2 shape also the patching sweep and the first-trial figure. The
    process keeps the memory it frees (djinn.allocator), for every tool alike: each result and each hooked
    batch brought to the host would otherwise touch fresh pages."""
    from djinn.allocator import keep_freed_memory

    keep_freed_memory()
    out = {"keep_freed_memory": True}
    for shape in shapes:
        hf, loaded = hf_model(shape)
        out[f"harvest_{shape}"] = part_harvest(shape, hf, loaded, trials=3 if shape == "gpt2" else 2)
        print(json.dumps(out, indent=2), flush=True)  # kept if a later shape fails
        if shape == "gpt2":
            out["patching_gpt2"] = part_patching(hf, loaded)
            out["first_trial_gpt2"] = part_first_trial(loaded)
        del hf, loaded
        torch.cuda.empty_cache()
    return out


def serve(shape: str, port: int, stamps_path: str) -> None:
    from djinn.server.launch import run

    stamp_engine()
    dump_on_sigterm(stamps_path)

    hf, loaded = hf_model(shape)
    del hf
    torch.cuda.empty_cache()
    run([loaded], port=port, api_keys=[], kv_memory=16 << 30, log_level="warning")


def throughput_row(client, n: int, trials: int, n_prompt=128, n_new=256) -> dict:
    """Every mode at `n` sessions, through client threads and through engine sinks: medians of `trials`
    (the modes taking turns, so a slow stretch of the host hits them alike), with every trial."""
    modes = ("plain", "steer", "pause25")
    for mode in modes:  # warm-up: graphs for this batch size, kernels compiled
        throughput(client, n, mode, n_prompt=n_prompt, n_new=8)
    stats = client._backend.service.engine.stats
    runs: dict[str, list[float]] = {}
    recorded: dict[str, list[int]] = {}  # graphs captured during each trial (a capture stalls the steps)
    for _ in range(trials):
        for mode in modes:
            for suffix, measure in (("", throughput), ("_engine_sinks", throughput_engine_sinks)):
                before = stats.graphs_recorded
                total, running = measure(client, n, mode, n_prompt=n_prompt, n_new=n_new)
                runs.setdefault(mode + suffix, []).append(total)
                recorded.setdefault(mode + suffix + "_graphs_recorded", []).append(stats.graphs_recorded - before)
                if running is not None:  # the sessions that never pause in pause25, in every mode
                    runs.setdefault(mode + "_running" + suffix, []).append(running)
    return {"sessions": n, **{k: med(v) for k, v in runs.items()}, **{k + "_trials": v for k, v in runs.items()},
            **recorded}


def part_throughput(trials: int = 3, sessions: tuple[int, ...] = (1, 8, 32, 64, 128)) -> dict:
    spec = SHAPES["mistral"]
    bw = copy_bandwidth()
    _, loaded = hf_model("mistral")
    wbytes = step_weight_bytes(loaded.model)
    client = djinn.connect(model=loaded, kv_memory=40 << 30)
    out = {"copy_bandwidth_GBps": bw / 1e9, "trials": trials, "rows": []}
    for n in sessions:
        row = throughput_row(client, n, trials)
        # floor: each step reads the weights once and every session's KV (mean context 128 + 128)
        step_bytes = wbytes + n * 256 * kv_bytes_per_token(spec["cfg"], spec["dtype"])
        row["floor_tokens_per_s"] = n / (step_bytes / bw)
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
    client.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["gpt2", "mistral", "throughput", "experiments"])
    ap.add_argument("--shapes", default="gpt2,llama3-8b", help="experiments: the shapes, comma-separated")
    ap.add_argument("--serve", choices=sorted(SHAPES), help="(internal) serve this shape for the WebSocket half")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--sessions", default="1,8,32,64,128", help="throughput: the session counts, comma-separated")
    ap.add_argument("--trials", type=int, default=3, help="throughput: trials per mode")
    ap.add_argument("--stamps", default="", help="(internal) where the server writes its engine's stamps")
    args = ap.parse_args()
    if args.serve:
        return serve(args.serve, args.port, args.stamps)
    if not args.part:
        ap.error("--part is required")
    info = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "command": " ".join(["python3", "benchmarks/bench.py"] + sys.argv[1:])}
    sessions = tuple(int(n) for n in args.sessions.split(","))
    if args.part == "experiments":
        return save(f"experiments_{args.shapes.replace(',', '_')}", {**info, **part_experiments(args.shapes.split(","))},
                    printed=False)
    result = part_throughput(args.trials, sessions) if args.part == "throughput" else part_latency(args.part)
    save(args.part, {**info, **result})


def save(part: str, result: dict, printed: bool = True) -> None:
    path = os.path.join(os.environ.get("OUT", "."), f"bench_{part}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    if printed:
        print("\n" + report(result))


if __name__ == "__main__":
    main()

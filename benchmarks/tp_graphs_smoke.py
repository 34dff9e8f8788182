"""Djinn's own tensor-parallel path on one GPU: the engine over a 1-rank NCCL group (djinn.parallel.group.start
with world 1), its steps replayed from CUDA graphs with the collectives captured inside, against the same
model served without tensor parallelism. Per shape (random weights, bfloat16): tokens and logits over a
prompt and 32 decode steps, captures at per-head and per-neuron sites, an edited head, an unmodified pause at
a head site and inside attention (bit-identical to no pause), the graphs recorded, and the median batch-1
decode step of the three engines (plain with graphs, 1-rank group with graphs, 1-rank group eager).

    python3 benchmarks/tp_graphs_smoke.py      # writes tp_graphs_smoke.json into $OUT
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import djinn  # noqa: E402
from djinn.client.embedded import EmbeddedBackend  # noqa: E402
from djinn.engine.engine import Engine  # noqa: E402
from djinn.models.config import ModelConfig  # noqa: E402
from djinn.models.loading import load_random  # noqa: E402
from djinn.parallel.group import start  # noqa: E402

SHAPES = {
    "gpt2-small": ModelConfig(family="gpt2", vocab_size=50257, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
                              d_mlp=3072, max_seq_len=1024, tie_embeddings=True),
    "llama-3.2-1b": ModelConfig(family="llama", vocab_size=128256, d_model=2048, n_layers=16, n_heads=32,
                                n_kv_heads=8, d_mlp=8192, max_seq_len=4096, rope_theta=500000.0,
                                tie_embeddings=True),
    "mixtral-small": ModelConfig(family="llama", vocab_size=32000, d_model=1024, n_layers=4, n_heads=16,
                                 n_kv_heads=4, d_mlp=2048, max_seq_len=4096, n_experts=8, experts_per_token=2,
                                 arch="mixtral"),
}
PROMPT = torch.randint(0, 32000, (96,), generator=torch.Generator().manual_seed(3)).tolist()


def model(cfg: ModelConfig, name: str):
    return load_random(cfg, torch.bfloat16, torch.device("cuda"), seed=5, name=name)


def client(cfg: ModelConfig, name: str, group: bool, graphs: bool):
    """A client of the engine over the model: plain, or over a tensor-parallel group of one."""
    loaded = model(cfg, name)
    leader = start([loaded], 1) if group else None
    engine = Engine([loaded], kv_memory=4 << 30, cuda_graphs=graphs)
    return djinn.Client(EmbeddedBackend(engine, on_close=leader.close if leader else None)), engine


def stream(sess, site: str):
    result, pauses = None, 0
    for ev in sess.stream(PROMPT, max_new_tokens=12, return_logits=True, stop_tokens=[],
                          breakpoints=[djinn.Breakpoint(site, steps=[0, 3, 7])]):
        if isinstance(ev, djinn.Paused):
            pauses += 1
            ev.resume()
        elif isinstance(ev, djinn.Done):
            result = ev.result
    return result, pauses


def decode_step_ms(c, n: int = 64, trials: int = 5) -> float:
    """Median over trials of the time per new token of one session decoding n tokens (a batch of one)."""
    times = []
    for _ in range(trials + 1):
        with c.session() as s:
            s.generate(PROMPT, max_new_tokens=1, stop_tokens=[])
            torch.cuda.synchronize()
            t = time.perf_counter()
            s.generate([], max_new_tokens=n, stop_tokens=[])
            times.append((time.perf_counter() - t) / n * 1e3)
    return statistics.median(times[1:])


def worker(engine):
    (w,) = engine.workers.values()
    return w


def check(name: str, cfg: ModelConfig) -> dict:
    heads = torch.ones(cfg.n_heads, cfg.d_head)
    heads[cfg.n_heads - 1] = 0.0
    captures = [djinn.Capture(f"blocks.1.{s}", steps=[0, 5]) for s in
                ("attn.hook_q", "attn.hook_z", "attn.hook_pattern", "mlp.hook_post", "hook_resid_post")]
    if cfg.n_experts:
        captures[3] = djinn.Capture("blocks.1.mlp.hook_expert_weights", steps=[0, 5])
    runs = {}
    for kind, group, graphs in (("plain", False, True), ("group_graphs", True, True), ("group_eager", True, False)):
        c, engine = client(cfg, name, group, graphs)
        try:
            r = {"plain": c.session().generate(PROMPT, max_new_tokens=33, return_logits=True, stop_tokens=[]),
                 "captured": c.session().generate(PROMPT, max_new_tokens=6, stop_tokens=[], interventions=captures),
                 "edited": c.session().generate(PROMPT, max_new_tokens=8, return_logits=True, stop_tokens=[],
                                                interventions=[djinn.Scale("blocks.0.attn.hook_z", heads)]),
                 "paused_z": stream(c.session(), "blocks.1.attn.hook_z"),
                 "paused_pattern": stream(c.session(), "blocks.1.attn.hook_pattern"),
                 "short": c.session().generate(PROMPT, max_new_tokens=12, return_logits=True, stop_tokens=[]),
                 "decode_ms": decode_step_ms(c),
                 "graphs": len(worker(engine).runner.graphs._graphs) if graphs else 0}
        finally:
            c.close()
        runs[kind] = r
        torch.cuda.empty_cache()

    def diff(a, b) -> float:
        return (a.float() - b.float()).abs().max().item()

    out = {}
    ref = runs["plain"]
    for kind in ("group_graphs", "group_eager"):
        r = runs[kind]
        out[kind] = {
            "tokens_equal": r["plain"].token_ids == ref["plain"].token_ids,
            "logits_bit_identical": torch.equal(r["plain"].logits, ref["plain"].logits),
            "logits_max_abs_diff": diff(r["plain"].logits, ref["plain"].logits),
            "captures_max_abs_diff": max(diff(r["captured"].captures[k], ref["captured"].captures[k])
                                         for k in ref["captured"].captures),
            "edited_tokens_equal": r["edited"].token_ids == ref["edited"].token_ids,
            "edited_logits_max_abs_diff": diff(r["edited"].logits, ref["edited"].logits),
            "edit_changed_logits": not torch.equal(r["edited"].logits, r["short"].logits[:8]),
            "pauses": [r["paused_z"][1], r["paused_pattern"][1]],
            "unmodified_pauses_bit_identical": all(
                p.token_ids == r["short"].token_ids and torch.equal(p.logits, r["short"].logits)
                for p, _ in (r["paused_z"], r["paused_pattern"])),
            "graphs_recorded": r["graphs"],
            "decode_step_ms": r["decode_ms"],
        }
    out["plain"] = {"decode_step_ms": ref["decode_ms"], "graphs_recorded": ref["graphs"]}
    out["ratio_group_graphs_to_plain"] = runs["group_graphs"]["decode_ms"] / ref["decode_ms"]
    out["ratio_group_eager_to_group_graphs"] = runs["group_eager"]["decode_ms"] / runs["group_graphs"]["decode_ms"]
    return out


def main() -> None:
    torch.cuda.set_device(0)
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "nccl": ".".join(map(str, torch.cuda.nccl.version())),
              "command": "python3 benchmarks/tp_graphs_smoke.py", "prompt_tokens": len(PROMPT), "shapes": {}}
    for name, cfg in SHAPES.items():
        result["shapes"][name] = check(name, cfg)
        print(name, json.dumps(result["shapes"][name]), flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), "tp_graphs_smoke.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()

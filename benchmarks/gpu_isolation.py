"""On a GPU, through the fused kernels and CUDA graphs: two owners share batched steps of a GPT-2-small-shaped
random model (float16), one of them hostile. Its calls overflow edits (Scale 1e38, two steers whose sum is
past float16, a huge steer of the final norm's output) and send out-of-range parameters; the other owner's
rows in the same steps must get exactly the tokens and logits they get beside a benign twin of the hostile
calls (the same edits with harmless values: the same batch, the same graphs, so the same bits), with the
KV pool filled with NaN beforehand and again after the hostile calls freed their blocks. Writes JSON into
the folder named by OUT (default: the current folder)."""
from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import djinn  # noqa: E402
from djinn.engine.engine import Engine  # noqa: E402
from djinn.models.loading import load_random  # noqa: E402
from gpu_smoke import GPT2_SMALL  # noqa: E402

N_NEW = 32
VICTIM_PROMPTS = [torch.randint(0, 50257, (n,), generator=torch.Generator().manual_seed(n)).tolist()
                  for n in (5, 17, 64, 130)]
HOSTILE_PROMPT = list(range(100, 140))


def hostile_edits(harmful: bool) -> list[list]:
    """Three hostile calls' interventions; with harmful=False the same sites and kinds, harmless values."""
    big = 6e4 if harmful else 1e-3  # each finite in float16, their sum not
    return [[djinn.Scale("blocks.0.hook_resid_post", 1e38 if harmful else 1.0)],
            [djinn.Steer("blocks.5.hook_attn_out", torch.full((768,), big)),
             djinn.Steer("blocks.5.hook_attn_out", torch.full((768,), big))],
            [djinn.Steer("ln_final.hook_out", torch.full((768,), 6e4 if harmful else 0.0))]]


def run_step_group(engine: Engine, harmful: bool) -> tuple[list, list]:
    """The victim's four rows and the three hostile rows (one new token each: after the first step their
    rows are gone either way, so every later step has the same batch) in the same steps."""
    out_v, out_h = [], []
    for edits in hostile_edits(harmful):
        sid = engine.create_session("hostile")
        out_h.append([])
        engine.generate(sid, "hostile", HOSTILE_PROMPT, out_h[-1].append, max_new_tokens=1, interventions=edits)
    for p in VICTIM_PROMPTS:
        sid = engine.create_session("victim")
        out_v.append([])
        engine.generate(sid, "victim", p, out_v[-1].append, max_new_tokens=N_NEW, return_logits=True,
                        stop_tokens=[])
    while engine.has_work():
        engine.step()
    engine.drain()
    for sid in list(engine.sessions):
        engine.close_session(sid, engine.sessions[sid].owner)
    return [ev[-1] for ev in out_v], [ev[-1] for ev in out_h]


def main() -> None:
    loaded = load_random(GPT2_SMALL, torch.float16, torch.device("cuda"), seed=0, name="gpt2-shape-random")
    engine = Engine([loaded], kv_memory=2 << 30)
    pool = engine.workers["gpt2-shape-random"].pool
    results = {}
    for name, harmful in [("benign", False), ("hostile", True), ("after_hostile", False)]:
        if name != "after_hostile":  # after the hostile round the NaN it left in freed blocks stays
            pool.kv.fill_(float("nan"))
        results[name] = run_step_group(engine, harmful)
    refused = {}
    sid = engine.create_session("hostile")
    for label, params in [("top_k_2**64-1", {"top_k": 2 ** 64 - 1, "temperature": 1.0}),
                          ("temperature_10**400", {"temperature": 10 ** 400}),
                          ("replace_1e300", {"interventions": [djinn.Replace(
                              "blocks.1.hook_resid_post", torch.full((768,), 1e300, dtype=torch.float64))]})]:
        try:
            engine.generate(sid, "hostile", HOSTILE_PROMPT, lambda ev: None, **params)
            refused[label] = "accepted"
        except djinn.DjinnError as e:
            refused[label] = e.code
    ref_v, ref_h = results["benign"]
    compared = agree = 0
    logits_identical = True
    for name in ("hostile", "after_hostile"):
        victims, _ = results[name]
        for a, b in zip(victims, ref_v):
            compared += len(b.result.token_ids)
            agree += sum(x == y for x, y in zip(a.result.token_ids, b.result.token_ids))
            logits_identical &= torch.equal(a.result.logits, b.result.logits)
    report = {
        "device": torch.cuda.get_device_name(),
        "victim_rows": len(VICTIM_PROMPTS), "victim_new_tokens": N_NEW,
        "victim_tokens_agree": f"{agree}/{compared}", "victim_logits_bit_identical": logits_identical,
        "benign_twins_finished": all(isinstance(e, djinn.Done) for e in ref_h),
        "hostile_errors": [e.error.code if isinstance(e, djinn.Error) else "finished" for e in results["hostile"][1]],
        "refused_before_the_step": refused,
        "graphs_recorded": engine.stats.graphs_recorded,
    }
    report["ok"] = (agree == compared and logits_identical and report["benign_twins_finished"]
                    and report["hostile_errors"] == ["non_finite"] * 3
                    and all(v != "accepted" for v in refused.values()))
    print(json.dumps(report, indent=1))
    with open(os.path.join(os.environ.get("OUT", "."), "gpu_isolation.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()

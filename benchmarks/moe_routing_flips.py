"""Where a Mixtral's bfloat16 logits part from transformers': at the positions whose top-2 experts differ
between the two (a near tie of the router flipped by rounding), or elsewhere. CPU, random weights scaled by
fan-in, a 4-layer Mixtral of d_model 1024 and 8 experts, a 64-token prompt.

    python3 benchmarks/moe_routing_flips.py     # writes moe_routing_flips.json into $OUT
"""
from __future__ import annotations

import json
import os
import sys

import torch
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import djinn  # noqa: E402
from djinn.models.loading import LoadedModel, _materialize, _to_djinn_state, config_from_hf  # noqa: E402


def main() -> None:
    cfg = transformers.MixtralConfig(vocab_size=32000, hidden_size=1024, intermediate_size=3584, num_hidden_layers=4,
                                     num_attention_heads=16, num_key_value_heads=4, num_local_experts=8,
                                     num_experts_per_tok=2, tie_word_embeddings=False, pad_token_id=0)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="eager").eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                std = 0.02 if ("embed" in name or "lm_head" in name) else p.shape[-1] ** -0.5
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    c = config_from_hf(hf.config.to_dict())
    model = _materialize(c, _to_djinn_state(c, dict(hf.state_dict())), torch.bfloat16, torch.device("cpu"))
    client = djinn.connect(model=LoadedModel("mixtral-small", c, model, None))
    prompt = list(range(100, 164))
    out = client.session().generate(prompt, max_new_tokens=0, return_logits="all",
                                    interventions=[djinn.Capture("blocks.*.mlp.hook_router_logits")])
    routed = {}
    hooks = [hf.model.layers[i].mlp.gate.register_forward_hook(lambda m, a, o, i=i: routed.__setitem__(i, o[2]))
             for i in range(c.n_layers)]
    with torch.no_grad():
        want = hf(torch.tensor([prompt])).logits[0].float()
    for h in hooks:
        h.remove()
    client.close()
    diff = (out.logits.float() - want).abs().max(-1).values
    flipped = torch.zeros(len(prompt), dtype=torch.bool)
    per_layer = []
    for i in range(c.n_layers):
        ours = out.captures[(f"blocks.{i}.mlp.hook_router_logits", 0)].float().topk(2, -1).indices.sort(-1).values
        differs = (ours != routed[i].sort(-1).values).any(-1)
        per_layer.append(int(differs.sum()))
        flipped |= differs
    result = {"command": "python3 benchmarks/moe_routing_flips.py", "torch": torch.__version__,
              "positions": len(prompt), "positions_whose_top2_differ_per_layer": per_layer,
              "max_logit_diff_where_a_routing_differs": diff[flipped].max().item() if flipped.any() else None,
              "max_logit_diff_elsewhere": diff[~flipped].max().item(), "largest_logit": want.abs().max().item()}
    print(json.dumps(result))
    with open(os.path.join(os.environ.get("OUT", "."), "moe_routing_flips.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()

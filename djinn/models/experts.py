"""A sparse mixture of experts in place of the MLP (Mixtral): a router scores every expert for each token,
the top k are renormalised to sum to one, and the token's output is their weighted sum.

The experts run as grouped products: tokens sorted by expert, every expert's rows in one `_grouped_mm`
call per product (no loop over experts, no host sync: capturable in CUDA graphs). Hook sites: the router's
logits ([n_experts]) and the expert weights ([n_experts], zero for the experts a token does not use), so an
edit of the weights re-mixes or knocks out experts, and an edit of the logits re-routes; and each expert's
neurons (`experts.{j}.hook_pre`, `hook_pre_linear`, `hook_post`, [d_mlp]) at every token, a token's output
taking them with its weight for that expert (zero where it does not route there).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .config import ModelConfig
from .layers import Hook, Linear, activation, gated_act, tl_linear


class Experts(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n, self.k, self.act = cfg.n_experts, cfg.experts_per_token, cfg.mlp_act
        self.router = Linear(cfg.d_model, cfg.n_experts, bias=False)
        # every expert's gated product (gate rows, then up rows) and output product, stacked
        self.in_proj = nn.Parameter(torch.empty(cfg.n_experts, 2 * cfg.d_mlp, cfg.d_model))
        self.down_proj = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model, cfg.d_mlp))

    def route(self, logits: torch.Tensor) -> torch.Tensor:
        """Each token's expert weights [N, n_experts]: the renormalised softmax of its top k, zero elsewhere."""
        probs = torch.softmax(logits.float(), dim=-1)
        top, chosen = probs.topk(self.k, dim=-1)
        return torch.zeros_like(probs).scatter(-1, chosen, top / top.sum(-1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(x, self.route(self.router(x)))

    def mix(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_e weights[t, e] * expert_e(x[t]) over each token's k heaviest experts (its chosen ones)."""
        n = x.shape[0]
        w, chosen = weights.topk(self.k, dim=-1)  # [N, k]
        order = chosen.flatten().argsort(stable=True)  # (token, slot) pairs grouped by expert
        counts = torch.zeros(self.n, dtype=torch.int64, device=x.device).index_add_(
            0, chosen.flatten(), torch.ones(n * self.k, dtype=torch.int64, device=x.device))
        ends = counts.cumsum(0).to(torch.int32)
        rows = x.index_select(0, order // self.k)
        h = torch._grouped_mm(rows, self.in_proj.transpose(1, 2), offs=ends)
        out = torch._grouped_mm(gated_act(h, self.act), self.down_proj.transpose(1, 2), offs=ends)
        per_slot = torch.empty_like(out)
        per_slot[order] = out  # back to (token, slot) order: the sum below runs in a fixed order
        return (per_slot.view(n, self.k, -1) * w.to(x.dtype)[..., None]).sum(1)

    def detailed(self, x: torch.Tensor, hook: Hook) -> torch.Tensor:
        """Every expert at every token of the row, each with its neurons shown (the detailed path runs only for
        a row that reads or edits inside this MLP)."""
        logits = hook("mlp.hook_router_logits", self.router(x).float()).to(x.dtype)
        weights = hook("mlp.hook_expert_weights", self.route(logits))
        out = torch.zeros_like(x)
        for e in range(self.n):
            gate, up = (x @ self.in_proj[e].T).chunk(2, dim=-1)
            pre, pre_linear = hook(f"mlp.experts.{e}.hook_pre", gate), hook(f"mlp.experts.{e}.hook_pre_linear", up)
            post = hook(f"mlp.experts.{e}.hook_post", activation(pre, self.act) * pre_linear)
            out += (post @ self.down_proj[e].T) * weights[:, e:e + 1].to(x.dtype)
        return out

    def weights(self) -> dict[str, torch.Tensor]:
        """TransformerLens's names: the router, and each expert's W_gate / W_in [d_model, d_mlp], W_out."""
        d = self.in_proj.shape[1] // 2
        out = tl_linear("W_router", "b_router", self.router)
        for e in range(self.n):
            out.update({f"experts.{e}.W_gate": self.in_proj[e, :d].T, f"experts.{e}.W_in": self.in_proj[e, d:].T,
                        f"experts.{e}.W_out": self.down_proj[e].T})
        return out

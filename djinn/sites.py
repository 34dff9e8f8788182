"""Hook-site names (TransformerLens vocabulary) and their resolution to the engine's sites.

The forward pass is a fixed chain of sites, each computed by one op of the fused fast path (the embedding,
a block's attention up to z, the output projection, the residual adds, the MLP, the final norm). Some
public names are aliases of one chain site: `blocks.{i}.hook_resid_post` is `blocks.{i+1}.hook_resid_pre`,
and where the embedding is the residual stream's start (no learned positions) `hook_embed` is
`blocks.0.hook_resid_pre`.

The values inside an op (norm scales, q/k/v, attention scores and patterns, per-head results, neurons) are
*detail* sites: the fused kernels never materialise them. A row that reads, edits or pauses at one gets that
op recomputed on the detailed path (`models/*.py`, `*_detailed`), for that row and layer only.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Union

from .errors import UnknownSite

RESID = "resid"  # a chain site whose value is the residual stream
BRANCH = "branch"  # a chain site whose value is a branch output (attention, MLP, final norm)
DETAIL = "detail"  # a value inside a chain op, computed on request

KEYS = "keys"  # in a shape: the length of the row's history (keys a query may see), known per step
Dim = Union[int, str]


@dataclass(frozen=True)
class Site:
    name: str  # canonical name
    index: int  # chain sites: position in the chain; detail sites: numbered after the chain, in forward order
    layer: int  # -1 for sites before the blocks, n_layers after them
    kind: str  # RESID, BRANCH or DETAIL
    op: str  # the chain op that computes it: embed | attn_z | attn_out | add | mlp_out | final_norm
    shape: tuple[Dim, ...]  # one token's value
    host: int  # the chain site whose op computes it (itself, for a chain site)
    local: str = ""  # a detail site's name inside its op ("attn.hook_pattern")
    heads_first: bool = False  # shown to clients as [n_heads, n_tokens, ...], as TransformerLens shows patterns

    @property
    def per_head(self) -> bool:
        return self.kind == BRANCH and len(self.shape) == 2


@dataclass(frozen=True)
class SiteInfo:
    """A public hook site as `ModelInfo.sites` lists it: `shape` of a call's value ("tokens": the tokens the
    call computes there; "keys": the session's history up to them)."""

    name: str
    shape: tuple[Dim, ...]
    kind: str


# Detail sites by op, in the order the op computes them. A family lists the ones its architecture has.
ATTENTION = ("ln1.hook_scale", "ln1.hook_normalized", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_rot_q",
             "attn.hook_rot_k", "attn.hook_attn_scores", "attn.hook_pattern")
PROJECTION = ("attn.hook_result",)
MLP = ("ln2.hook_scale", "ln2.hook_normalized", "mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post")
FINAL = ("ln_final.hook_scale", "ln_final.hook_normalized")
EMBEDDING = ("hook_embed", "hook_pos_embed")


def detail_shape(local: str, cfg) -> tuple[Dim, ...]:
    """One token's value at a detail site."""
    last = local.rsplit(".", 1)[-1]
    h, kv, dh, d = cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_model
    return {"hook_scale": (1,), "hook_normalized": (d,), "hook_q": (h, dh), "hook_k": (kv, dh), "hook_v": (kv, dh),
            "hook_rot_q": (h, dh), "hook_rot_k": (kv, dh), "hook_attn_scores": (h, KEYS), "hook_pattern": (h, KEYS),
            "hook_result": (h, d), "hook_pre": (cfg.d_mlp,), "hook_pre_linear": (cfg.d_mlp,),
            "hook_post": (cfg.d_mlp,), "hook_embed": (d,), "hook_pos_embed": (d,),
            "hook_router_logits": (cfg.n_experts,), "hook_expert_weights": (cfg.n_experts,)}[last]


class SiteTable:
    """Every public site name of one model, resolved to its site. `details`: the family's detail sites per
    op (local names, in order); an op without an entry has none."""

    def __init__(self, cfg, details: dict[str, tuple[str, ...]]):
        self.cfg = cfg
        n, d, z = cfg.n_layers, (cfg.d_model,), (cfg.n_heads, cfg.d_head)
        chain = [("blocks.0.hook_resid_pre", -1, RESID, "embed", d)]
        for i in range(n):
            b = f"blocks.{i}"
            chain += [(f"{b}.attn.hook_z", i, BRANCH, "attn_z", z), (f"{b}.hook_attn_out", i, BRANCH, "attn_out", d),
                      (f"{b}.hook_resid_mid", i, RESID, "add", d), (f"{b}.hook_mlp_out", i, BRANCH, "mlp_out", d),
                      (f"{b}.hook_resid_post", i, RESID, "add", d)]
        chain.append(("ln_final.hook_out", n, BRANCH, "final_norm", d))
        self.sites = [Site(name, k, layer, kind, op, shape, k) for k, (name, layer, kind, op, shape) in enumerate(chain)]
        self.details: list[Site] = []
        for host in self.sites:
            for local in details.get(host.op, ()):
                prefix = "" if host.layer < 0 or host.layer == n else f"blocks.{host.layer}."
                self.details.append(Site(prefix + local, len(self.sites) + len(self.details), host.layer, DETAIL,
                                         host.op, detail_shape(local, cfg), host.index, local,
                                         local.endswith(("hook_attn_scores", "hook_pattern"))))
        self.by_index = self.sites + self.details
        self.public: dict[str, Site] = {s.name: s for s in self.by_index}
        if "hook_embed" not in self.public:
            self.public["hook_embed"] = self.sites[0]
        for i in range(1, n):
            self.public[f"blocks.{i}.hook_resid_pre"] = self.public[f"blocks.{i - 1}.hook_resid_post"]
        # a parallel block has no resid_mid: its attention output joins the residual with the MLP's, so that
        # add is always left to the MLP op
        self.always_deferred = frozenset()
        if cfg.parallel_residual:
            mids = [self.public.pop(f"blocks.{i}.hook_resid_mid") for i in range(n)]
            self.always_deferred = frozenset(s.index for s in mids)
        self._order = sorted(self.public, key=lambda name: self.order(self.public[name]) + (name,))

    @staticmethod
    def order(site: Site) -> tuple[int, int, int]:
        """Forward order: a detail site comes before its host chain site's value."""
        return (site.host, 0 if site.kind == DETAIL else 1, site.index)

    def __getitem__(self, index: int) -> Site:
        return self.by_index[index]

    def info(self) -> list[SiteInfo]:
        out = []
        for name in self._order:
            s = self.public[name]
            shape = ("tokens",) + s.shape
            if s.heads_first:
                shape = (shape[1], shape[0]) + shape[2:]
            out.append(SiteInfo(name, tuple(shape), s.kind))
        return out

    def resolve(self, pattern: str) -> list[tuple[str, Site]]:
        """Public names matching `pattern` (which may contain `*`), with their sites."""
        if not isinstance(pattern, str) or not pattern:
            raise UnknownSite(f"site must be a non-empty string, got {pattern!r}")
        if "*" not in pattern:
            site = self.public.get(pattern)
            if site is None:
                raise UnknownSite(f"unknown hook site {pattern!r}; sites look like 'blocks.3.hook_resid_post' "
                                  f"or 'blocks.3.attn.hook_pattern' (ModelInfo.sites lists them all)")
            return [(pattern, site)]
        hits = [(n, self.public[n]) for n in self._order if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise UnknownSite(f"site pattern {pattern!r} matches no hook site")
        return hits

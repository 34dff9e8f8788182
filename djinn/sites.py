"""Hook-site names (TransformerLens vocabulary) and their resolution to the engine's canonical sites.

The forward pass is a fixed sequence of canonical sites. Some public names are aliases of the same
tensor: `hook_embed` is `blocks.0.hook_resid_pre`, and `blocks.{i}.hook_resid_post` is
`blocks.{i+1}.hook_resid_pre`.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from .errors import UnknownSite

RESID = "resid"  # the site's value is the residual stream
BRANCH = "branch"  # the site's value is a branch output (attention, MLP, final norm)


@dataclass(frozen=True)
class Site:
    name: str  # canonical name
    index: int  # position in the forward pass
    layer: int  # -1 for sites outside the blocks
    kind: str  # RESID or BRANCH
    op: str  # what computes it: embed | attn_z | attn_out | add | mlp_out | final_norm
    per_head: bool = False  # value is [T, n_heads, d_head] instead of [T, d_model]


def canonical_sites(n_layers: int) -> list[Site]:
    """The forward pass, in order, for a model with `n_layers` blocks."""
    names: list[tuple[str, int, str, str]] = [("hook_embed", -1, RESID, "embed")]
    for i in range(n_layers):
        b = f"blocks.{i}"
        names += [
            (f"{b}.attn.hook_z", i, BRANCH, "attn_z"),
            (f"{b}.hook_attn_out", i, BRANCH, "attn_out"),
            (f"{b}.hook_resid_mid", i, RESID, "add"),
            (f"{b}.hook_mlp_out", i, BRANCH, "mlp_out"),
            (f"{b}.hook_resid_post", i, RESID, "add"),
        ]
    names.append(("ln_final.hook_normalized", n_layers, BRANCH, "final_norm"))
    return [Site(n, k, layer, kind, op, op == "attn_z") for k, (n, layer, kind, op) in enumerate(names)]


class SiteTable:
    """Maps every public site name of one model to its canonical site."""

    def __init__(self, n_layers: int):
        self.sites = canonical_sites(n_layers)
        by_name = {s.name: s for s in self.sites}
        self.public: dict[str, Site] = dict(by_name)
        self.public["blocks.0.hook_resid_pre"] = by_name["hook_embed"]
        for i in range(1, n_layers):
            self.public[f"blocks.{i}.hook_resid_pre"] = by_name[f"blocks.{i - 1}.hook_resid_post"]
        self._order = sorted(self.public, key=lambda n: (self.public[n].index, n))

    def resolve(self, pattern: str) -> list[tuple[str, Site]]:
        """Public names matching `pattern` (which may contain `*`), with their canonical sites."""
        if not isinstance(pattern, str) or not pattern:
            raise UnknownSite(f"site must be a non-empty string, got {pattern!r}")
        if "*" not in pattern:
            site = self.public.get(pattern)
            if site is None:
                raise UnknownSite(f"unknown hook site {pattern!r}; sites look like 'blocks.3.hook_resid_post' "
                                  f"(valid: {self.example_names()})")
            return [(pattern, site)]
        hits = [(n, self.public[n]) for n in self._order if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise UnknownSite(f"site pattern {pattern!r} matches no hook site")
        return hits

    def example_names(self) -> str:
        return ("hook_embed, blocks.{i}.hook_resid_pre, blocks.{i}.attn.hook_z, blocks.{i}.hook_attn_out, "
                "blocks.{i}.hook_resid_mid, blocks.{i}.hook_mlp_out, blocks.{i}.hook_resid_post, "
                f"ln_final.hook_normalized, with 0 <= i < {len(self.sites) // 5}")

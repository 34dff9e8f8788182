"""One row's op on the detailed path: the values the fused kernels never materialise (norm scales, q/k/v,
scores and patterns, per-head results, neurons), computed for the row that reads, edits or pauses at them.

The model's `*_detailed` methods hand each detail site's value to a hook; here the hook applies the row's
edits there, stages its captures and keeps its pause's value. A row whose op is only read keeps the fast
path's output bit for bit (the detailed run is a side computation); a row that edits inside the op takes the
detailed output, and its edited keys and values are written to the cache.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ..errors import InvalidTensor, NonFinite
from ..models.attention import RowKV
from ..parallel import gather, sharded, split
from ..sites import Site, SiteTable
from .plan import Edit, Probe, fold_edits


@dataclass
class OpDetail:
    """A row's work at the detail sites of one op in this step."""

    edits: dict[int, list[Edit]] = field(default_factory=dict)  # detail site -> edits there
    captures: list[tuple[int, Probe]] = field(default_factory=list)
    pause: Optional[Probe] = None  # the row pauses at this detail site


@dataclass
class DetailPause:
    """A row paused at a detail site: what finishing its op after the resume needs."""

    site: int
    op_input: torch.Tensor  # the op's input rows: residual stream, z, or token ids
    replacement: Optional[torch.Tensor] = None  # the client's value for the site, token-first


def present(site: Site, value: torch.Tensor) -> torch.Tensor:
    """A site's value as clients see it: [n_heads, n_tokens, ...] for patterns and scores."""
    return value.transpose(0, 1).contiguous() if site.heads_first else value


def accept(site: Site, value: torch.Tensor) -> torch.Tensor:
    """A client's value for a site, token-first again (the swap undoes itself)."""
    return present(site, value)


class DetailRun:
    """The hook of one row's detailed op. `skip_before`: a resumed row's run re-derives the values before
    its pause site without reporting them again, and takes `replacement` (if any) at that site. With `tp` (a
    tensor-parallel rank's group) the op hands in this rank's part of a per-head or per-neuron value: where
    something reads or edits it, it is gathered whole for that and split back for the op."""

    def __init__(self, table: SiteTable, host: int, row, work: OpDetail, take: Callable[[Any, Probe, torch.Tensor], None],
                 skip_before: Optional[int] = None, replacement: Optional[torch.Tensor] = None, tp=None):
        """`take(row, probe, value)` records a capture (runner.Runner.take)."""
        self.sites = {s.local: s for s in table.details if s.host == host}
        self.row, self.work, self.take, self.tp = row, work, take, tp
        self.order = table.order
        self.resume_at = None if skip_before is None else table.order(table[skip_before])
        self.replacement = replacement
        self.paused: Optional[tuple[Probe, torch.Tensor]] = None  # the pause met on the way, with its value

    def __call__(self, local: str, value: torch.Tensor) -> torch.Tensor:
        site = self.sites.get(local)
        if site is None:  # a value this family does not show
            return value
        if self.tp is not None and sharded(site) and self._reads(site):
            return split(self._visit(site, gather(value, self.tp)), self.tp)
        return self._visit(site, value)

    def _reads(self, site: Site) -> bool:
        """Whether the row edits, captures, pauses or resumes at the site (the same on every rank)."""
        w = self.work
        return bool(w.edits.get(site.index)) or any(at == site.index for at, _ in w.captures) or \
            (w.pause is not None and w.pause.site == site.index) or \
            (self.resume_at is not None and self.order(site) == self.resume_at)

    def _visit(self, site: Site, value: torch.Tensor) -> torch.Tensor:
        edits = self.work.edits.get(site.index)
        if edits:
            value = self._edited(site, value, edits)
        if self.resume_at is not None and self.order(site) <= self.resume_at:  # reported before the pause
            if self.order(site) == self.resume_at and self.replacement is not None:
                return self.replacement.to(device=value.device, dtype=value.dtype)
            return value
        for at, probe in self.work.captures:
            if at == site.index:
                self.take(self.row, probe, present(site, value))
        pause = self.work.pause
        if pause is not None and pause.site == site.index and self.paused is None:
            self.paused = (pause, value.clone())
        return value

    def _edited(self, site: Site, value: torch.Tensor, edits: list[Edit]) -> torch.Tensor:
        r = self.row
        try:
            new = edit_row(value, edits, r)
        except RuntimeError:  # only the history's length can disagree: it is known per step
            raise InvalidTensor(f"an edit at {site.name} does not fit its value's shape {list(value.shape[1:])} in "
                                f"step {r.step} (its last dimension spans the {value.shape[-1]} positions "
                                f"of the history)") from None
        if not torch.isfinite(new).all():
            raise NonFinite(f"an edit at {site.name} made its value NaN or Inf in step {r.step}")
        return new


def edit_row(value: torch.Tensor, edits: list[Edit], row) -> torch.Tensor:
    """One row's edits at a site applied to its value, in float32 and rounded once (as the batched edits)."""
    mul, add = fold_edits(edits, row.span.start, row.span.n_tokens, tuple(value.shape[1:]), value.device)
    return (value.float() * mul + add).to(value.dtype)


def edits_inside(work: Optional[OpDetail]) -> bool:
    return work is not None and any(work.edits.values())


def row_kv(row, block_size: int, window: Optional[int], write: bool, rope, device: torch.device) -> RowKV:
    """Where the row's history lives in the cache (positions 0 .. its last token)."""
    n = row.span.start + row.span.n_tokens
    pos = torch.arange(n)
    table = torch.tensor(row.span.block_table, dtype=torch.long)
    blocks, offsets = table[pos // block_size], pos % block_size
    return RowKV(pos[row.span.start:].to(device), blocks.to(device), offsets.to(device), window or 0, write, rope)


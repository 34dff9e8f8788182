"""Compile a request's interventions, captures and breakpoints against one model: resolve sites, validate
and convert tensors once, so that a step only looks up what applies to it."""
from __future__ import annotations

import itertools
import operator
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .. import validation
from ..errors import InvalidRequest, InvalidTensor
from ..interventions import EDIT_TYPES, Ablate, Breakpoint, Capture, LogitLens, Replace, Scale, Steer, normalize_steps
from ..sites import KEYS, Site, SiteTable
from .batch import to_device
from .lens import Lens


@dataclass(frozen=True)
class Edit:
    """act <- replace if replace is set, else act * mul + add (per selected token)."""

    site: int
    steps: Optional[frozenset[int]]
    positions: Optional[tuple[int, ...]]
    mul: Optional[torch.Tensor] = None
    add: Optional[torch.Tensor] = None
    replace: Optional[torch.Tensor] = None
    uid: int = field(default_factory=itertools.count().__next__)  # never reused, unlike id()

    def applies(self, step: int) -> bool:
        return self.steps is None or step in self.steps

    def reaches(self, step: int, positions: list[int]) -> bool:
        """Whether it applies to a row's tokens at `positions` in `step`."""
        return self.applies(step) and (self.positions is None or any(p in self.positions for p in positions))


@dataclass(frozen=True)
class Probe:
    """A capture, a logit lens or a breakpoint: a public site name to report under."""

    site: int
    name: str
    steps: Optional[frozenset[int]]
    lens: Optional[Lens] = None  # a capture that reports the value's logit lens instead of the value

    def applies(self, step: int) -> bool:
        return self.steps is None or step in self.steps


@dataclass
class Plan:
    edits: dict[int, list[Edit]] = field(default_factory=lambda: defaultdict(list))
    captures: dict[int, list[Probe]] = field(default_factory=lambda: defaultdict(list))
    breakpoints: dict[int, list[Probe]] = field(default_factory=lambda: defaultdict(list))
    # what the executors derive from the plan once, where every step derives the same (a plan never changes)
    memo: dict = field(default_factory=dict, compare=False, repr=False)

    def step_invariant(self) -> bool:
        """Whether every step of a fresh row does the same: no breakpoints, no steps or positions named."""
        if "invariant" not in self.memo:
            self.memo["invariant"] = not any(self.breakpoints.values()) and all(
                p.steps is None for ps in self.captures.values() for p in ps) and all(
                e.steps is None and e.positions is None for es in self.edits.values() for e in es)
        return self.memo["invariant"]

    def empty(self) -> bool:
        return not self.sites()

    def sites(self) -> set[int]:
        """Every site something is declared at, whatever its steps."""
        return {k for d in (self.edits, self.captures, self.breakpoints) for k, items in d.items() if items}

    def extend(self, other: "Plan") -> "Plan":
        """This plan's items, then `other`'s (either itself where the other is empty: plans never change)."""
        if other.empty():
            return self
        if self.empty():
            return other
        out = Plan()
        for mine, theirs, dst in [(self.edits, other.edits, out.edits), (self.captures, other.captures, out.captures),
                                  (self.breakpoints, other.breakpoints, out.breakpoints)]:
            for key, items in list(mine.items()) + list(theirs.items()):
                dst[key].extend(items)
        return out


def fold_edits(edits: Sequence[Edit], start: int, n_tokens: int, shape: tuple[int, ...],
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One row's edits at a site, in order, as per-token float32 (mul, add) for the row's tokens at positions
    start..start + n_tokens - 1: the edited value is act * mul + add, composed as (x * m1 + a1) * m2 + a2, a
    replacement being mul 0, add the new value."""
    mul = torch.ones((n_tokens, *shape), device=device)
    add = torch.zeros((n_tokens, *shape), device=device)
    for e in edits:
        if e.positions is None:
            local, which = slice(None), None
        else:
            hits = [(p - start, k) for k, p in enumerate(e.positions) if start <= p < start + n_tokens]
            if not hits:
                continue
            local = to_device(torch.tensor([h[0] for h in hits]), device)
            which = [h[1] for h in hits]
        if e.replace is not None:
            mul[local] = 0.0
            add[local] = _selected(e.replace, which, shape)
            continue
        if e.mul is not None:
            m = _selected(e.mul, which, shape)
            mul[local] = mul[local] * m
            add[local] = add[local] * m
        if e.add is not None:
            add[local] = add[local] + _selected(e.add, which, shape)
    return mul, add


def _selected(t: torch.Tensor, which: Optional[list[int]], shape) -> torch.Tensor:
    """An edit's values for the selected tokens: its row per listed position, or the one per-token value."""
    if which is not None and t.dim() == len(shape) + 1:
        return t[to_device(torch.tensor(which), t.device)]
    return t


def _fits(got: tuple[int, ...], shape: tuple) -> bool:
    return len(got) == len(shape) and all(g == d or d == KEYS for g, d in zip(got, shape))


class Compiler:
    """Validates client data against one model (sites, shapes, dtypes, finiteness)."""

    def __init__(self, sites: SiteTable, dtype: torch.dtype, device: torch.device):
        self.sites, self.dtype, self.device = sites, dtype, device

    @staticmethod
    def site_shape(site: Site) -> tuple:
        """One token's value at `site`; KEYS (the history's length) is known per step, so any length or 1
        passes here and a step checks it."""
        return site.shape

    def tensor(self, t, what: str, shape: tuple[int, ...], n_rows: Optional[int],
               dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """A client tensor of `shape` (or [n_rows, *shape]) on the model's device, as `dtype` (default: the
        model's), finite after that conversion (a float64 1e300 is finite, its float32 is not)."""
        if not isinstance(t, torch.Tensor):
            raise InvalidTensor(f"{what} must be a torch.Tensor, got {type(t).__name__}")
        if not (t.is_floating_point()):
            raise InvalidTensor(f"{what} must be a floating-point tensor, got {t.dtype}")
        ok = _fits(tuple(t.shape), shape) or (n_rows is not None and _fits(tuple(t.shape), (n_rows, *shape)))
        if not ok:
            want = f"{list(shape)}" + (f" or [{n_rows}, {', '.join(map(str, shape))}]" if n_rows else "")
            raise InvalidTensor(f"{what} has shape {list(t.shape)}, expected {want}")
        if not torch.isfinite(t).all():
            raise InvalidTensor(f"{what} contains NaN or Inf")
        out = t.detach().to(device=self.device, dtype=dtype or self.dtype)
        self.representable(out, what, dtype or self.dtype)
        # a snapshot: the caller may change their tensor later (and another thread reads ours)
        return out.clone() if out.data_ptr() == t.data_ptr() else out

    @staticmethod
    def representable(t: torch.Tensor, what: str, dtype: torch.dtype) -> None:
        """Raise unless every value of `t` is finite in `dtype`."""
        if not torch.isfinite(t.to(dtype)).all():
            raise InvalidTensor(f"{what} holds values beyond the range of {str(dtype).removeprefix('torch.')}")

    def compile(self, items: Sequence, breakpoints: Sequence[Breakpoint] = ()) -> Plan:
        plan = Plan()
        for item in items:
            if isinstance(item, Capture):
                steps = self._steps(item.steps)
                for name, site in self.sites.resolve(item.site):
                    plan.captures[site.index].append(Probe(site.index, name, steps))
            elif isinstance(item, LogitLens):
                lens = self._lens(item)
                for name, site in self.sites.resolve(item.site):
                    if site.shape[-1] != self.sites.cfg.d_model or site.heads_first:
                        raise InvalidRequest(f"LogitLens needs a residual-shaped site (its values end in d_model "
                                             f"{self.sites.cfg.d_model}); {name} has shape {list(site.shape)}")
                    if any(p.lens is not None for p in plan.captures[site.index]):
                        raise InvalidRequest(f"two LogitLens at {name}: their results would share out.lens[({name!r}, "
                                             f"step)]; ask for one (the larger top_k)")
                    plan.captures[site.index].append(Probe(site.index, name, self._steps(item.steps), lens))
            elif isinstance(item, EDIT_TYPES):
                for name, site in self.sites.resolve(item.site):
                    plan.edits[site.index].append(self._edit(item, name, site))
            else:
                raise InvalidRequest(f"not an intervention: {type(item).__name__} (use Steer, Scale, Replace, "
                                     f"Ablate, Capture or LogitLens)")
        for bp in breakpoints:
            if not isinstance(bp, Breakpoint):
                raise InvalidRequest(f"breakpoints must be djinn.Breakpoint, got {type(bp).__name__}")
            steps = self._steps(bp.steps)
            for name, site in self.sites.resolve(bp.site):
                plan.breakpoints[site.index].append(Probe(site.index, name, steps))
        return plan

    def _lens(self, item: LogitLens) -> Lens:
        top_k = validation.integer(item.top_k, "LogitLens top_k", 1, self.sites.cfg.vocab_size)
        return Lens(top_k, None if item.positions is None else frozenset(self._positions(item.positions, item.site)))

    @staticmethod
    def _positions(positions, name: str) -> tuple[int, ...]:
        try:
            out = tuple(operator.index(p) for p in positions)
        except TypeError:
            raise InvalidRequest(f"positions for {name} must be a list of integers") from None
        if not out or min(out) < 0 or len(set(out)) != len(out):
            raise InvalidRequest(f"positions for {name} must be distinct non-negative integers")
        return out

    @staticmethod
    def _number(value, what: str) -> float:
        try:
            return validation.number(value, what)
        except InvalidRequest as e:
            raise InvalidTensor(e.message) from None

    @staticmethod
    def _steps(steps) -> Optional[frozenset[int]]:
        try:
            return normalize_steps(steps)
        except (TypeError, ValueError) as e:
            raise InvalidRequest(str(e)) from None

    def _edit(self, item, name: str, site: Site) -> Edit:
        """Edit values are kept in float32: the edit is computed in float32 and rounded to the model's dtype
        once, as `act * 0.9` with a Python number does in PyTorch."""
        shape = self.site_shape(site)
        f32 = torch.float32
        positions = None if item.positions is None else self._positions(item.positions, name)
        n_rows = len(positions) if positions is not None else None
        common = dict(site=site.index, steps=self._steps(item.steps), positions=positions)
        what = f"{type(item).__name__} tensor for {name}"
        if isinstance(item, Steer):
            scale = self._number(item.scale, f"Steer scale for {name}")
            add = self.tensor(item.vector, what, shape, n_rows, f32) * scale
            self.representable(add, f"{what} times its scale", self.dtype)  # what the activation gains
            return Edit(add=add, **common)
        if isinstance(item, Scale):
            factor = item.factor
            if isinstance(factor, (int, float)):
                factor = torch.tensor(self._number(factor, f"Scale factor for {name}"), dtype=f32, device=self.device)
                self.representable(factor, f"Scale factor for {name}", f32)
                return Edit(mul=factor, **common)
            return Edit(mul=self.tensor(factor, what, shape, n_rows, f32), **common)
        if isinstance(item, (Replace, Ablate)):  # the new value is written in the model's dtype
            value = item.tensor if isinstance(item, Replace) else item.mean
            if value is None:
                return Edit(replace=torch.zeros(shape, dtype=f32, device=self.device), **common)
            new = self.tensor(value, what, shape, n_rows, f32)
            self.representable(new, what, self.dtype)
            return Edit(replace=new, **common)
        raise InvalidRequest(f"unknown intervention {type(item).__name__}")

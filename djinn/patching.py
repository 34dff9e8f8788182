"""Activation patching as batched runs: the clean prompt's activations are captured once, then every patched
run of the corrupted prompt (one per site and position, or per site, position and head) goes to the engine
in one `client.run`, and a metric of each run's next-token logits fills the grid.

    grid = activation_patch(client, clean, corrupted, sites="blocks.*.hook_resid_pre",
                            metric=logit_diff(good_id, bad_id))        # [n_sites, n_positions]
    plot(grid, sites=..., positions=client.to_str_tokens(corrupted))   # a heatmap (matplotlib)

A patch sets the site's value at one position of the corrupted run to the clean run's, at the prompt's
forward (step 0); per head (`per_head=True`, sites with a head dimension: q/k/v, z, pattern, scores, result),
only that head's slice, so the grid is [n_sites, n_positions, n_heads].
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import torch

from .errors import InvalidRequest
from .interventions import Capture, Replace, Scale, Steer

if TYPE_CHECKING:
    from .client.api import Client, Prompt


@dataclass(frozen=True)
class LogitDiff:
    """logit[good] - logit[bad] of the next token."""

    good: int
    bad: int

    def __call__(self, logits: torch.Tensor) -> float:
        return float(logits[self.good] - logits[self.bad])


@dataclass(frozen=True)
class LogProb:
    """log p(token) of the next token."""

    token: int

    def __call__(self, logits: torch.Tensor) -> float:
        return float(torch.log_softmax(logits.float(), -1)[self.token])


def logit_diff(good: int, bad: int) -> LogitDiff:
    return LogitDiff(good, bad)


def logprob(token: int) -> LogProb:
    return LogProb(token)


def metric_of(client: "Client", prompt: "Prompt", metric, model: Optional[str] = None) -> float:
    """The metric of an unpatched prompt (the clean and corrupted baselines a grid is read against)."""
    (out,) = client.run([prompt], model=model, max_new_tokens=1, return_logits=True, stop_tokens=[])
    return metric(out.logits[0])


def activation_patch(client: "Client", clean: "Prompt", corrupted: "Prompt", *,
                     sites: Union[str, Sequence[str]] = "blocks.*.hook_resid_pre", metric,
                     positions: Optional[Sequence[int]] = None, per_head: bool = False,
                     model: Optional[str] = None, window: int = 1024) -> torch.Tensor:
    """The metric of the corrupted prompt's next-token logits with each (site, position) patched from the clean
    prompt: [n_sites, n_positions], or [n_sites, n_positions, n_heads] with `per_head`. `sites`: names or
    patterns (`*`; a pattern's sites in forward order), the grid's rows in that order; `positions`: absolute positions (default: every token); the prompts
    must have the same number of tokens."""
    clean_ids, corrupted_ids = _ids(client, clean, model), _ids(client, corrupted, model)
    if len(clean_ids) != len(corrupted_ids):
        raise InvalidRequest(f"the clean prompt has {len(clean_ids)} tokens and the corrupted one "
                             f"{len(corrupted_ids)}: patching pairs them position by position")
    infos = {s.name: s for s in client.sites(model)}
    names = _resolve(sites, list(infos))
    positions = list(range(len(clean_ids))) if positions is None else [int(p) for p in positions]
    if any(not 0 <= p < len(clean_ids) for p in positions):
        raise InvalidRequest(f"positions must be in [0, {len(clean_ids)}), got {positions}")
    if per_head:
        flat = [n for n in names if not _has_heads(infos[n])]
        if flat:
            raise InvalidRequest(f"per_head patching needs sites with a head dimension; {flat[0]} has none")
    (captured,) = client.run([clean], model=model, interventions=[Capture(n, steps=[0]) for n in names])
    runs, cells = [], []
    for i, name in enumerate(names):
        heads_first = _heads_first(infos[name])
        for j, p in enumerate(positions):
            value = _at(captured.captures[(name, 0)], p, heads_first)
            if not per_head:
                runs.append([Replace(name, value, positions=[p], steps=[0])])
                cells.append((i, j))
                continue
            for h in range(value.shape[0]):
                keep = torch.ones_like(value, dtype=torch.float32)
                keep[h] = 0
                only = torch.zeros_like(value)
                only[h] = value[h]
                runs.append([Scale(name, keep, positions=[p], steps=[0]), Steer(name, only, positions=[p], steps=[0])])
                cells.append((i, j, h))
    shape = (len(names), len(positions)) + ((max(c[2] for c in cells) + 1,) if per_head else ())
    grid = torch.full(shape, float("nan"))
    results = client.run([corrupted] * len(runs), model=model, interventions=runs, max_new_tokens=1,
                         return_logits=True, stop_tokens=[], window=window)
    for cell, out in zip(cells, results):
        grid[cell] = metric(out.logits[0])
    return grid


def plot(grid: torch.Tensor, sites: Sequence[str], positions: Sequence[Any], *, ax=None, title: str = "",
         cmap: str = "RdBu", center: Optional[float] = 0.0):
    """A patching grid as a heatmap (sites down, positions across), on `ax` or a new figure; returns the axes.
    Needs matplotlib (`pip install djinn[plot]`)."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(max(4, 0.5 * len(positions) + 2), max(3, 0.3 * len(sites) + 1.5)))
    values = grid.detach().float()
    if values.dim() == 3:
        raise InvalidRequest("plot takes a [n_sites, n_positions] grid: pick a head (grid[..., h]) or sum over them")
    limit = float(values.abs().nan_to_num().max()) if center is not None else None
    image = ax.imshow(values.numpy(), cmap=cmap, aspect="auto",
                      vmin=None if limit is None else center - limit, vmax=None if limit is None else center + limit)
    ax.set_yticks(range(len(sites)), list(sites))
    ax.set_xticks(range(len(positions)), [str(p) for p in positions], rotation=90)
    ax.set_xlabel("position")
    ax.set_title(title)
    ax.figure.colorbar(image, ax=ax)
    return ax


def _ids(client: "Client", prompt: "Prompt", model: Optional[str]) -> list[int]:
    return client.tokenize(prompt, model) if isinstance(prompt, str) else [int(t) for t in prompt]


def _resolve(sites: Union[str, Sequence[str]], names: list[str]) -> list[str]:
    """The sites in the order given, each pattern's in forward order."""
    patterns = [sites] if isinstance(sites, str) else list(sites)
    out = list(dict.fromkeys(n for p in patterns for n in names if fnmatch.fnmatchcase(n, p)))
    if not out:
        raise InvalidRequest(f"no hook site matches {patterns}")
    return out


def _heads_first(info) -> bool:
    return info.shape[0] != "tokens"


def _token_first(shape: tuple) -> tuple:
    """A site's per-token shape, the tokens dimension taken out."""
    return tuple(d for d in shape if d != "tokens")


def _has_heads(info) -> bool:
    """Whether a site's per-token value has a head dimension first ([n_heads, ...])."""
    return _heads_first(info) or len(_token_first(info.shape)) >= 2


def _at(capture: torch.Tensor, position: int, heads_first: bool) -> torch.Tensor:
    """One position's value of a capture of the whole prompt, token-first as edits take it."""
    return capture[:, position] if heads_first else capture[position]

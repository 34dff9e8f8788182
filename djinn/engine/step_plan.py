"""The plan of one step's sites, computed once and carried out by either executor: the eager runner
(runner.py) walks it site by site, the graph executor (cuda_graphs.py) replays it segment by segment.

For each row: the sites it computes (from the embedding, or from the site after the one it paused at, to
the final norm or the site it pauses at now), the captures it takes on the way, and its edits per site.
For the step: the cuts, the sites after which the host acts (a row pauses, is captured, or re-enters), and
the sites whose residual add stays explicit, and the ops some row runs on the detailed path (detail.py):
a row's work at detail sites is kept per op, at the chain site the op computes. Elsewhere a residual add is deferred into the next norm's
kernel (which adds and normalises in one pass, with the same bits as a separate add): nothing reads the
sum at such a site, so nothing needs it there.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..sites import DETAIL, SiteTable
from .detail import OpDetail
from .plan import Edit, Probe


@dataclass
class RowSites:
    """The sites one row computes in this step: first..last, pausing at `last` if `pause` is set (a row that
    neither pauses nor reaches the final site ends its call there: a forward-only row past its captures)."""

    first: int  # 0: from the embedding; else the site after the one it paused at
    last: int
    pause: Optional[Probe]
    captures: list[tuple[int, Probe]] = field(default_factory=list)  # (site, what to report it as)
    details: dict[int, OpDetail] = field(default_factory=dict)  # chain site -> the row's work inside its op
    memo: dict = field(default_factory=dict, compare=False, repr=False)  # what an executor derives once

    def computes(self, site: int) -> bool:
        return self.first <= site <= self.last


@dataclass
class StepPlan:
    rows: list  # the step's rows (runner.Row)
    sites: list[RowSites]  # row i's
    edits: dict[int, list[list[Edit]]]  # site -> each row's edits there (only sites some row edits)
    cuts: list[int]  # sites after which the host acts, ascending
    offsets: list[int]  # row i's tokens are offsets[i]:offsets[i + 1]
    explicit_adds: frozenset[int]  # sites whose residual add is not deferred (edited or cut there)
    details: frozenset[int] = frozenset()  # chain sites whose op some row runs on the detailed path

    @property
    def decode(self) -> bool:
        """One token a row: the logits are the whole batch's."""
        return self.offsets[-1] == len(self.rows)

    def defer_add(self, site: int) -> bool:
        """Whether an add at `site` may be left to the next norm's kernel."""
        return site not in self.explicit_adds


def segments(cuts: list[int], final: int) -> list[tuple[int, int]]:
    """(first, last) site of each run between cuts; the last run ends the forward (after a cut at the final
    site it holds no site, only the unembedding)."""
    starts = [0] + [c + 1 for c in cuts]
    return list(zip(starts, cuts + [final]))


def plan_step(rows: list, table: SiteTable) -> StepPlan:
    """What each row computes, its edits, its work inside ops, and where the step is cut."""
    final = len(table.sites) - 1
    offsets = [0]
    for r in rows:
        offsets.append(offsets[-1] + r.span.n_tokens)
    sites, edits, cuts = [], {}, set()
    plain = RowSites(0, final, None)  # shared by the fresh rows that declare nothing (nobody changes a RowSites)
    for i, r in enumerate(rows):
        plan = r.plan
        if not (plan.breakpoints or plan.captures or plan.edits):  # most rows declare nothing: no walk
            row, row_edits = (plain if r.entry is None else RowSites(r.entry + 1, final, None)), {}
        elif r.entry is None and plan.step_invariant():  # every step's walk is the same: the first one's
            key = ("walk", r.request.stop_after)  # (plans are shared: a run's prompts, a session's calls)
            if key not in plan.memo:
                plan.memo[key] = _walk(r, table, final)
            row, row_edits = plan.memo[key]
        else:
            row, row_edits = _walk(r, table, final)
        for s, es in row_edits.items():
            if s not in edits:  # (setdefault would build the list of lists for every edited row)
                edits[s] = [[] for _ in rows]
            edits[s][i].extend(es)
        sites.append(row)
        if row.first > 0:
            cuts.add(row.first - 1)
        if row.pause is not None:
            cuts.add(row.last)
        cuts.update(s for s, _ in row.captures)
    # the eager runner works inside a detail op at its chain site; the graphs cut there (or keep scores)
    hosts = frozenset(h for s in sites for h in s.details)
    return StepPlan(rows, sites, edits, sorted(cuts), offsets, frozenset(cuts) | frozenset(edits) | hosts, hosts)


def _walk(r, table: SiteTable, final: int) -> tuple[RowSites, dict[int, list[Edit]]]:
    """One row's sites, captures, work inside ops and edits at chain sites in its step."""
    plan, step = r.plan, r.step
    first, pause, captures, details, edits = 0 if r.entry is None else r.entry + 1, None, [], {}, {}
    last = final if r.request.stop_after is None else r.request.stop_after  # a forward-only row stops early
    for s in sorted((k for k in plan.breakpoints if table[k].host >= first), key=lambda k: table.order(table[k])):
        pause = next((p for p in plan.breakpoints[s] if p.applies(step)), None)
        if pause is not None:
            last = table[s].host
            break
    stop = table.order(table[pause.site]) if pause is not None else None
    for s in sorted(plan.captures):
        site = table[s]
        if first <= site.host <= last and (stop is None or table.order(site) <= stop):
            for p in plan.captures[s]:
                if p.applies(step):
                    (details.setdefault(site.host, OpDetail()).captures if site.kind == DETAIL
                     else captures).append((s, p))
    for s, es in plan.edits.items():
        site = table[s]
        if first <= site.host <= last:
            for e in es:
                if e.reaches(step, r.positions):
                    if site.kind == DETAIL:
                        details.setdefault(site.host, OpDetail()).edits.setdefault(s, []).append(e)
                    else:
                        edits.setdefault(s, []).append(e)
    if pause is not None and table[pause.site].kind == DETAIL:
        details.setdefault(last, OpDetail()).pause = pause
    return RowSites(first, last, pause, captures, details), edits

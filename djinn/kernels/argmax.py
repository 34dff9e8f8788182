"""Greedy decoding's pick, the index of each row's largest logit, in Triton.

PyTorch's argmax reduces one row of a large vocabulary in a single block (15 us for GPT-2's 50257 logits on
an H200, more than any other kernel of its one-token step), and so does one program per row. Here each row
is shared out over programs of SLICE logits each; each writes its slice's pick, and the row's last program
to finish (an arrival tally per row tells it, djinn/kernels/tallies.py) reduces those picks in a fixed order,
all in one launch. The result is torch.argmax's: the first index of the maximum, a NaN counting as the maximum.
The same pass tells whether every logit of the row is finite (the engine fails a row whose logits are not).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import dependent_launch, tallies
from .dependent_launch import wait_for_inputs

SLICE = 4096  # logits per program
NUM_WARPS = 8


@triton.jit
def _first_best(v, i):
    """(value, index) of the first NaN of (v, i) if there is one, else of the first maximum."""
    is_nan = v != v
    any_nan = tl.max(is_nan.to(tl.int32), axis=0) > 0
    top = tl.max(tl.where(is_nan, float("-inf"), v), axis=0)
    winners = tl.where(any_nan, is_nan, v == top)
    return tl.where(any_nan, float("nan"), top), tl.min(tl.where(winners, i, 2147483647), axis=0)


@triton.jit
def _argmax_kernel(x_ptr, out_ptr, finite_ptr, part_v_ptr, part_i_ptr, part_bad_ptr, count_ptr, stride_x, V,
                   N_SLICES, SLICE: tl.constexpr, SLICES_P: tl.constexpr, DEPENDENT: tl.constexpr):
    wait_for_inputs(DEPENDENT)
    row = tl.program_id(0)
    part = tl.program_id(1)
    idx = part * SLICE + tl.arange(0, SLICE)
    mask = idx < V
    v = tl.load(x_ptr + row.to(tl.int64) * stride_x + idx, mask=mask, other=float("-inf")).to(tl.float32)
    best_v, best_i = _first_best(v, tl.where(mask, idx, 2147483647))
    bad = mask & ((v != v) | (tl.abs(v) == float("inf")))
    tl.store(part_v_ptr + row * SLICES_P + part, best_v)
    tl.store(part_i_ptr + row * SLICES_P + part, best_i)
    tl.store(part_bad_ptr + row * SLICES_P + part, tl.sum(bad.to(tl.int32), axis=0))
    # release our pick (whichever threads stored it: the barrier); the last of the row's programs acquires all
    tl.debug_barrier()
    if tl.atomic_add(count_ptr + row, 1, sem="acq_rel") == N_SLICES - 1:
        parts = tl.arange(0, SLICES_P)
        pmask = parts < N_SLICES
        pv = tl.load(part_v_ptr + row * SLICES_P + parts, mask=pmask, other=float("-inf"), volatile=True)
        pi = tl.load(part_i_ptr + row * SLICES_P + parts, mask=pmask, other=2147483647, volatile=True)
        n_bad = tl.load(part_bad_ptr + row * SLICES_P + parts, mask=pmask, other=0, volatile=True)
        _, index = _first_best(pv, pi)
        tl.store(out_ptr + row, index.to(tl.int64))
        tl.store(finite_ptr + row, (tl.sum(n_bad, axis=0) == 0).to(tl.int64))
        tl.atomic_xchg(count_ptr + row, 0)


def argmax(logits: torch.Tensor, tally_slots: Optional[torch.Tensor] = None,
           out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """logits: [B, V] with unit stride along V; tally_slots: zeroed arrival tallies, at least B (None: a fresh
    buffer). Returns `out` (a new one if None): [2, B] int64, logits.argmax(-1), then 1 for each row whose
    logits are all finite, else 0."""
    rows, vocab = logits.shape
    if out is None:
        out = torch.empty((2, rows), dtype=torch.int64, device=logits.device)
    if rows == 0:
        return out
    counters = tallies.slots(tally_slots, rows, logits.device)
    n_slices = triton.cdiv(vocab, SLICE)
    slices_p = triton.next_power_of_2(n_slices)
    part_v = torch.empty((rows, slices_p), dtype=torch.float32, device=logits.device)
    part_i = torch.empty((rows, slices_p), dtype=torch.int32, device=logits.device)
    part_bad = torch.empty((rows, slices_p), dtype=torch.int32, device=logits.device)
    _argmax_kernel[(rows, n_slices)](logits, out[0], out[1], part_v, part_i, part_bad, counters, logits.stride(0),
                                     vocab, n_slices, SLICE=SLICE, SLICES_P=slices_p, num_warps=NUM_WARPS,
                                     **dependent_launch.options())
    return out

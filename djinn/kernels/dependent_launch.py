"""Programmatic dependent launch (Hopper and later) for the one-token step's Triton kernels.

A one-token step of a small model is a chain of short kernels (GPT-2 small: about 80 of 1.5-4 us each) and
each boundary costs the next kernel's launch and ramp after the last one has drained. Launched as a
dependent, a kernel starts while its predecessor still runs: it does what depends on nothing the
predecessor writes (its addresses; the one-token products pull their weight rows into L2, weights being
written by no step), then `griddepcontrol.wait` holds it until the predecessor has finished and its writes
are visible. Every kernel here lets its own dependents start only after that wait, so what runs before a
kernel's wait may read anything the kernels before its predecessor wrote, and must write nothing.

Nothing in the arithmetic changes: a kernel computes the same values launched either way, inside a CUDA
graph (stream capture keeps the programmatic edges) or not.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # a Triton without grid dependency control: nothing is launched as a dependent
    gdc_launch_dependents = gdc_wait = None

ENV_VAR = "DJINN_DEPENDENT_LAUNCH"  # "1": launch as dependents (an error where unsupported); else plainly
_enabled: Optional[bool] = None  # None: decided on first use, from ENV_VAR and the device


def supported() -> bool:
    """Whether this process can launch dependents: a CUDA device of compute capability 9.0 or later, a Triton
    with grid dependency control, and compiled kernels (Triton's interpreter runs programs one by one)."""
    return (gdc_wait is not None and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
            and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9)


def set_enabled(on: bool) -> None:
    """Launch the step kernels as dependents or not; kernels and graphs captured from then on follow (for
    A/B benchmarks; the default comes from ENV_VAR)."""
    global _enabled
    if on and not supported():
        raise RuntimeError("dependent launches need a CUDA device of compute capability 9.0+ and a Triton "
                           "with grid dependency control")
    _enabled = on


def enabled() -> bool:
    if _enabled is None:
        set_enabled(os.environ.get(ENV_VAR, "0") == "1")
    return bool(_enabled)


def options() -> dict:
    """Launch keywords for a kernel taking a `DEPENDENT: tl.constexpr` that starts with `wait_for_inputs`."""
    return {"DEPENDENT": True, "launch_pdl": True} if enabled() else {"DEPENDENT": False}


@triton.jit
def wait_for_inputs(DEPENDENT: tl.constexpr):
    """Hold until the predecessor kernel has finished (its writes visible), then let this kernel's own
    dependent start launching. A no-op when not launched as a dependent."""
    if DEPENDENT:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs):
    """Bring the cache lines holding `ptrs` into L2: a hint that changes no value (L2 is where every SM's
    reads and writes meet, so a line fetched early is never stale)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)

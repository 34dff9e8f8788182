"""Programmatic dependent launch (Hopper and later) for the step's Triton kernels.

A one-token step of a small model is a chain of short kernels (GPT-2 small: 87 Triton kernels of 1.5-4 us
each), and each boundary costs the next kernel's launch and ramp after the last one has drained. Launched as a
dependent, a kernel's programs start while its predecessor still runs and hold at `griddepcontrol.wait`
until the predecessor has finished and its writes are visible. Every kernel here waits before it reads or
writes anything, and lets its own dependent start only once its wait is over. The prompt attention kernel
and the few-row products launch plainly.

Nothing in the arithmetic changes: a kernel computes the same values launched either way, inside a CUDA
graph (stream capture keeps the programmatic edges) or not. On an H100 (benchmarks/results) GPT-2's
one-token step went from 0.375 to 0.356 ms and the Mistral-7B shape's from 5.46 to 5.25 ms, bit for bit the
same tokens and logits; 64 Mistral-shape sessions, whose products are cuBLAS's, ran 0.4% slower in a
separate process.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # a Triton without grid dependency control: kernels launch plainly
    gdc_launch_dependents = gdc_wait = None

ENV_VAR = "DJINN_DEPENDENT_LAUNCH"  # "0": launch plainly; "1": as dependents (an error where unsupported)
_enabled: Optional[bool] = None  # None: decided on first use, from ENV_VAR and the device


def supported() -> bool:
    """Whether this process can launch dependents: a CUDA device of compute capability 9.0 or later, a Triton
    with grid dependency control, and compiled kernels (Triton's interpreter runs programs one by one)."""
    return (gdc_wait is not None and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
            and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9)


def set_enabled(on: bool) -> None:
    """Launch the step kernels as dependents or plainly; kernels and graphs captured from then on follow."""
    global _enabled
    if on and not supported():
        raise RuntimeError("dependent launches need a CUDA device of compute capability 9.0+ and a Triton "
                           "with grid dependency control")
    _enabled = on


def enabled() -> bool:
    """Whether the step kernels launch as dependents: by default wherever supported."""
    if _enabled is None:
        choice = os.environ.get(ENV_VAR, "")
        set_enabled(choice == "1" if choice in ("0", "1") else supported())
    return bool(_enabled)


def options() -> dict:
    """Launch keywords for a kernel taking a `DEPENDENT: tl.constexpr` that starts with `wait_for_inputs`."""
    return {"DEPENDENT": True, "launch_pdl": True} if enabled() else {"DEPENDENT": False}


@triton.jit
def wait_for_inputs(DEPENDENT: tl.constexpr):
    """Hold until the predecessor kernel has finished (its writes visible), then let this kernel's own
    dependent start launching. Nothing when not launched as a dependent."""
    if DEPENDENT:
        gdc_wait()
        gdc_launch_dependents()

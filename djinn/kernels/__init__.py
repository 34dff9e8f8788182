"""GPU kernels (Triton). Imported only when a CUDA device is in use (or Triton's interpreter is on)."""

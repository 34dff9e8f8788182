"""The process's allocator setting for moving large activation frames (server and client alike)."""
from __future__ import annotations

import ctypes


def keep_freed_memory() -> None:
    """Let this process keep the memory it frees instead of handing it back to the OS after every large
    frame. glibc maps each buffer over 128 KiB afresh, so every activation frame (encoded, packed, framed,
    received, decoded) touches new pages, and in a virtual machine each first touch is a costly fault.
    glibc only; a no-op elsewhere. It changes the allocator of the whole process: `djinn serve` calls it; a
    remote client's process does when asked (`djinn.connect(url, keep_freed_memory=True)`)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    mallopt(M_MMAP_THRESHOLD, 32 << 20)  # buffers up to 32 MiB (glibc's most) come from the heap...
    mallopt(M_TRIM_THRESHOLD, 512 << 20)  # ...which keeps up to 512 MiB of freed memory

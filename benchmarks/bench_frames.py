"""Host cost of one activation frame on this machine: the server encodes a paused activation (safetensors,
then msgpack), the client decodes it. Run twice in fresh processes: as the process starts, and after
`keep_freed_memory()` (what `djinn serve` calls), to see what first-touch page faults cost here.

    python3 benchmarks/bench_frames.py            # default allocator settings
    python3 benchmarks/bench_frames.py --keep     # after keep_freed_memory()
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from djinn.events import Paused  # noqa: E402
from djinn.allocator import keep_freed_memory  # noqa: E402
from djinn.wire import decode_event, encode_event, pack, unpack  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    if args.keep:
        keep_freed_memory()
    for rows, d, dtype in ((512, 768, torch.float16), (512, 4096, torch.bfloat16)):
        act = torch.randn(rows, d).to(dtype)
        ev = Paused("blocks.6.hook_resid_post", 0, list(range(rows)), act, pause_id=1)
        enc, dec = [], []
        for i in range(60):
            t = time.perf_counter()
            frame = pack(encode_event(ev))
            t1 = time.perf_counter()
            decode_event(unpack(frame))
            t2 = time.perf_counter()
            if i >= 10:
                enc.append((t1 - t) * 1e3)
                dec.append((t2 - t1) * 1e3)
        print(f"{'kept' if args.keep else 'default'} allocator, {rows}x{d} {str(dtype)[6:]} ({len(frame) / 1e6:.1f} MB): "
              f"encode {statistics.median(enc):.3f} ms, decode {statistics.median(dec):.3f} ms")


if __name__ == "__main__":
    main()

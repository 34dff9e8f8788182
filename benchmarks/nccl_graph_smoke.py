"""What one GPU can show of tensor parallelism's collectives: a 1-rank NCCL group whose all-reduce is
captured inside a CUDA graph and replayed (the way a sharded step's two all-reduces would sit in its graph),
checked against the same ops run eagerly; and the time of a replay against the eager ops.

    python3 benchmarks/nccl_graph_smoke.py      # writes nccl_graph_smoke.json into $OUT
"""
from __future__ import annotations

import json
import os
import socket
import time

import torch
import torch.distributed as dist


def main() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) * 4096 ** -0.5

    def step(inp: torch.Tensor) -> torch.Tensor:  # a row-sharded product and its all-reduce, twice
        h = inp @ w.T
        dist.all_reduce(h)
        h = torch.relu(h) @ w.T
        dist.all_reduce(h)
        return h

    eager = step(x.clone())
    static = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step(static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(static)
    graph.replay()
    torch.cuda.synchronize()
    same = torch.equal(out, eager)
    static.copy_(x * 2)  # new inputs: the replay follows them
    graph.replay()
    torch.cuda.synchronize()
    follows = torch.equal(out, step(x * 2))

    def timed(fn, n=200) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / n * 1e6

    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "nccl": ".".join(map(str, torch.cuda.nccl.version())),
              "command": "python3 benchmarks/nccl_graph_smoke.py",
              "replay_equals_eager": same, "replay_follows_new_inputs": follows,
              "eager_us": timed(lambda: step(static)), "replay_us": timed(graph.replay)}
    dist.destroy_process_group()
    print(json.dumps(result))
    with open(os.path.join(os.environ.get("OUT", "."), "nccl_graph_smoke.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()

"""Starting, watching and stopping the ranks of a tensor-parallel group.

Rank 0 is the caller's process. It starts ranks 1..N-1 (spawned processes), sets up the process group on a
free loopback port (gloo on the CPU, NCCL on GPUs), sends each rank the models' configs and every weight,
and then talks to each rank through a pipe: what a rank runs next arrives there (mirror.py), while the
steps' collectives go over the process group. A rank waiting for work waits on its pipe, without a
collective's timeout, and sees rank 0 go away as the pipe closing. Rank 0 watches the other processes: once
one exits, every later step fails with RankFailed, and a collective of a step under way fails by the group's
timeout at the latest.
"""
from __future__ import annotations

import atexit
import logging
import os
import pickle
import secrets
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from multiprocessing.connection import Client, Listener
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from ..errors import InvalidRequest, RankFailed
from ..models import build_model
from ..models.loading import LoadedModel
from . import TensorParallel
from .mirror import follow
from .shard import check_shardable, shard_model

log = logging.getLogger("djinn.parallel")


class Leader:
    """Rank 0's end of the group: the other ranks' processes and pipes."""

    def __init__(self, processes: list[subprocess.Popen], pipes: list, group):
        self.processes, self.pipes, self.group = processes, pipes, group
        self.lost: Optional[str] = None  # why the group cannot compute any more
        self._closing = False
        for rank, p in enumerate(processes, 1):
            threading.Thread(target=self._watch, args=(rank, p), name=f"djinn-tp-watch{rank}", daemon=True).start()

    def tell(self, msg: tuple) -> None:
        """Send `msg` to every other rank (nothing once the group is lost: rank 0 keeps its own state)."""
        if self.lost is not None:
            return
        data = pickle.dumps(msg)
        for rank, pipe in enumerate(self.pipes, 1):
            try:
                pipe.send_bytes(data)
            except OSError as e:
                self.lose(f"the pipe to rank {rank} closed ({e})")
                return

    def send(self, msg: tuple) -> None:
        """As `tell`, for work the other ranks must do: raises RankFailed where they cannot."""
        self.tell(msg)
        self.check()

    def check(self) -> None:
        if self.lost is not None:
            raise RankFailed(self.lost)

    def lose(self, why: str) -> RankFailed:
        """Mark the group lost (the first reason sticks); returns the error to raise."""
        if self.lost is None:
            self.lost = f"tensor parallelism lost a rank: {why}; this model cannot compute any more"
            log.error(self.lost)
        return RankFailed(self.lost)

    def exited(self, wait: float = 1.0) -> Optional[int]:
        """A rank whose process has exited, if any (waiting up to `wait` s for one on its way out)."""
        deadline = time.monotonic() + wait
        for rank, p in enumerate(self.processes, 1):
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
                return rank
            except subprocess.TimeoutExpired:
                pass
        return None

    def _watch(self, rank: int, process: subprocess.Popen) -> None:
        code = process.wait()
        if not self._closing:
            self.lose(f"rank {rank} exited (exit code {code})")

    def close(self, timeout: float = 10.0) -> None:
        """Stop the other ranks and leave the group."""
        if self._closing:
            return
        self._closing = True
        self.tell(("stop", 0))
        for p in self.processes:
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
        for pipe in self.pipes:
            pipe.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(backend: str, port: int, rank: int, world: int, timeout: float) -> None:
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout))


def _connect(listener: Listener, processes: list[subprocess.Popen], timeout: float) -> list:
    """Each rank's pipe, in rank order, once it has called in; a rank that exits first fails the start."""
    pipes: dict[int, object] = {}

    def accept() -> None:
        for _ in processes:
            pipe = listener.accept()
            pipes[pipe.recv()] = pipe

    waiter = threading.Thread(target=accept, daemon=True)
    waiter.start()
    deadline = time.monotonic() + timeout
    while waiter.is_alive():
        waiter.join(0.05)
        for rank, p in enumerate(processes, 1):
            if p.poll() is not None:
                raise RankFailed(f"tensor-parallel rank {rank} exited while starting (exit code {p.returncode})")
        if time.monotonic() > deadline:
            raise RankFailed(f"tensor-parallel ranks did not start within {timeout:g} s")
    return [pipes[rank] for rank in range(1, len(processes) + 1)]


def start(models: Sequence[LoadedModel], world: int, timeout: float = 60.0) -> Leader:
    """Shard `models` (loaded here, on one device) over `world` ranks, this process being rank 0: each model
    keeps its rank 0 shard and gets its `tp`. `timeout`: how long starting, or a collective, may wait for a
    rank. A group of one (`world` 1) runs every collective over itself alone: how one device checks the
    tensor-parallel path, graphs and collectives included (djinn.connect's tensor_parallel=1 forms none)."""
    if world < 1:
        raise InvalidRequest(f"tensor parallelism needs at least 1 rank, got {world}")
    if dist.is_initialized():
        raise InvalidRequest("tensor parallelism sets up its own process group: this process already has one")
    for m in models:
        check_shardable(m.config, world)
    device = next(models[0].model.parameters()).device
    if device.type == "cuda" and torch.cuda.device_count() < (device.index or 0) + world:
        last = (device.index or 0) + world - 1
        raise InvalidRequest(f"tensor_parallel={world} from {device} needs GPUs up to cuda:{last}; this machine "
                             f"has {torch.cuda.device_count()}")
    backend = "nccl" if device.type == "cuda" else "gloo"
    port, key = _free_port(), secrets.token_bytes(32)
    threads = max(1, (os.cpu_count() or 1) // world)
    # a fresh interpreter per rank (not multiprocessing's spawn, which re-runs the caller's main script)
    with Listener(("127.0.0.1", 0), authkey=key) as listener:
        host, pipe_port = listener.address
        env = {**os.environ, "DJINN_TP_KEY": key.hex()}
        processes = []
        for rank in range(1, world):
            rank_device = f"cuda:{(device.index or 0) + rank}" if device.type == "cuda" else "cpu"
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "djinn.parallel", str(rank), str(world), str(port), backend, rank_device,
                 f"{host}:{pipe_port}", str(timeout), str(threads)], env=env))
        try:
            pipes = _connect(listener, processes, timeout)
            _init(backend, port, 0, world, timeout)
        except BaseException:
            for p in processes:
                p.kill()
            raise
    leader = Leader(processes, pipes, dist.group.WORLD)
    atexit.register(leader.close)
    leader.tell(("models", 0, [(m.config, next(m.model.parameters()).dtype) for m in models]))
    for i, m in enumerate(models):
        for t in m.model.state_dict().values():
            dist.broadcast(t, 0)
        # weight reads answer with the weights whole, as loaded (kept on the host)
        whole = {k: v.to("cpu") for k, v in m.model.weights().items()}
        shard_model(m.model, TensorParallel(0, world, leader.group, leader, i))
        m.model.weights = whole.copy
    return leader


def rank_main(argv: list[str]) -> None:
    """A rank other than 0 (`python -m djinn.parallel RANK WORLD PORT BACKEND DEVICE PIPE TIMEOUT THREADS`):
    receive the models, keep this rank's shard of each, then run what rank 0 sends."""
    rank, world, port = int(argv[0]), int(argv[1]), int(argv[2])
    backend, dev, (host, pipe_port) = argv[3], torch.device(argv[4]), argv[5].rsplit(":", 1)
    timeout, threads = float(argv[6]), int(argv[7])
    torch.set_num_threads(threads)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    pipe = Client((host, int(pipe_port)), authkey=bytes.fromhex(os.environ.pop("DJINN_TP_KEY")))
    pipe.send(rank)
    _init(backend, port, rank, world, timeout)
    _, _, configs = pickle.loads(pipe.recv_bytes())
    models = []
    for i, (cfg, dtype) in enumerate(configs):
        with torch.device("meta"):
            model = build_model(cfg)
        model = model.to_empty(device=dev).to(dtype).eval().requires_grad_(False)
        if cfg.tie_embeddings:
            model.lm_head.weight = model.embed.weight
        for t in model.state_dict().values():
            dist.broadcast(t, 0)
        if cfg.family == "llama":
            model.build_rotary(dev)
        shard_model(model, TensorParallel(rank, world, dist.group.WORLD, None, i))
        models.append(model)
    try:
        follow(pipe, models, dev)
    finally:
        dist.destroy_process_group()

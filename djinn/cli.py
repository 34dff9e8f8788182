"""The `djinn` command: `djinn serve ...` runs a server, `djinn demo ...` runs the demo."""
from __future__ import annotations

import argparse
import re
import sys
from typing import Optional, Sequence

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'512M', '2G', '2GiB', '1073741824' -> bytes (K/M/G/T are powers of 1024)."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512M, 2G, or a number of bytes)")
    return int(float(m.group(1)) * 1024 ** " kmgt".index((m.group(2) or " ").lower()))


def _replica(text: str) -> str:
    from .errors import DjinnError
    from .replica import replica_name

    try:
        return replica_name(text)
    except DjinnError as e:
        raise argparse.ArgumentTypeError(e.message) from None


def _parser() -> argparse.ArgumentParser:
    from .server.limits import Limits  # no server dependencies: a dataclass of numbers

    p = argparse.ArgumentParser(prog="djinn", description="Djinn: a white-box LLM inference server.")
    sub = p.add_subparsers(dest="command", required=True)

    lim = Limits()
    s = sub.add_parser("serve", help="serve models over HTTP/WebSocket (and OpenAI-compatible /v1/completions and "
                                     "/v1/chat/completions)")
    s.add_argument("--model", action="extend", nargs="+", metavar="PATH_OR_REPO_ID", default=None,
                   help="model folder, llama2.c .bin, or Hugging Face repo id in the local cache; repeat for "
                        "several; each is served under its folder or file name (default: the small model shipped "
                        "with Djinn, served as djinn-default)")
    s.add_argument("--host", default="127.0.0.1", help="interface to bind; without API keys only loopback is "
                                                       "allowed (default: %(default)s)")
    s.add_argument("--port", type=int, default=8421, help="port to listen on (default: %(default)s)")
    s.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    s.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="weights' dtype (default: bfloat16 on GPU, float32 on CPU)")
    s.add_argument("--kv-memory", type=parse_size, default=None,
                   help="KV cache budget, e.g. 4G (default: half the free GPU memory, 256M on CPU)")
    s.add_argument("--api-keys", metavar="FILE", default=None,
                   help="file of API keys, one per line; DJINN_API_KEYS is read too (default: none, loopback only)")
    s.add_argument("--pause-ttl", type=float, default=300.0,
                   help="seconds a session may stay paused at a breakpoint before it is freed (default: %(default)s)")
    s.add_argument("--idle-ttl", type=float, default=3600.0,
                   help="seconds a session may stay untouched before it is closed (default: %(default)s)")
    s.add_argument("--kv-share-per-key", type=float, default=None,
                   help="largest share of the KV blocks (device and host) one API key may hold (default: 0.5 "
                        "with API keys, 1 without)")
    s.add_argument("--queue-timeout", type=float, default=60.0,
                   help="seconds a request may wait for KV memory before it fails (default: %(default)s)")
    s.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"per-request cap on generated tokens (default: {lim.max_new_tokens})")
    s.add_argument("--max-sessions-per-key", type=int, default=None,
                   help=f"sessions one API key may hold at once (default: {lim.max_sessions_per_key})")
    s.add_argument("--max-checkpoints-per-key", type=int, default=None,
                   help=f"checkpoints one API key may keep (default: {lim.max_checkpoints_per_key})")
    s.add_argument("--max-frame-bytes", type=parse_size, default=None,
                   help=f"largest frame or request body, e.g. 64M (default: {lim.max_frame_bytes >> 20}M)")
    s.add_argument("--replica", type=_replica, default=None, metavar="NAME",
                   help="this server's name behind a load balancer: every session and checkpoint id it hands "
                        "out starts with NAME and a dot, so the balancer routes by id (default: none)")
    s.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="split each model over N devices (N processes: cuda:0..N-1 with NCCL, or CPU ranks with "
                        "gloo); heads, KV heads and MLP columns must divide by N (default: %(default)s)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default: %(default)s)")

    d = sub.add_parser("demo", help="pause a generation mid-forward, edit, resume: the engine end to end")
    d.add_argument("--model", default=None, metavar="PATH_OR_REPO_ID",
                   help="default: the small model shipped with Djinn")
    d.add_argument("--device", default="cpu")
    d.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    d.add_argument("--max-new-tokens", type=int, default=40)
    d.add_argument("--scale", type=float, default=1.0, help="steering strength (multiples of the direction)")
    return p


def _load(specs: Optional[Sequence[str]], dtype: str, device: str) -> list:
    from tqdm import tqdm

    from .models.loading import load_models

    if not specs:
        with tqdm(total=1, desc="loading the default model", unit="model", file=sys.stderr) as bar:
            models = load_models(None, dtype, device)
            bar.update(1)
        return models
    models = []
    with tqdm(specs, desc="loading models", unit="model", file=sys.stderr) as bar:
        for spec in bar:
            bar.set_postfix_str(spec)
            models.extend(load_models(spec, dtype, device))
    return models


def serve(args: argparse.Namespace) -> int:
    import torch

    from .errors import DjinnError
    from .server.launch import run
    from .server.limits import Limits

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    changes = {k: v for k, v in (("max_new_tokens", args.max_new_tokens),
                                 ("max_sessions_per_key", args.max_sessions_per_key),
                                 ("max_checkpoints_per_key", args.max_checkpoints_per_key),
                                 ("max_frame_bytes", args.max_frame_bytes)) if v is not None}
    try:
        models = _load(args.model, dtype, device)
        run(models, host=args.host, port=args.port, dtype=dtype, device=device, kv_memory=args.kv_memory,
            api_keys_file=args.api_keys, limits=Limits().replace(**changes), log_level=args.log_level,
            pause_ttl=args.pause_ttl, idle_ttl=args.idle_ttl, kv_share_per_key=args.kv_share_per_key,
            queue_timeout=args.queue_timeout, replica=args.replica, tensor_parallel=args.tensor_parallel)
    except DjinnError as e:
        print(f"djinn: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"djinn: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "demo":
        from . import demo

        return demo.main(args) or 0
    return 1


if __name__ == "__main__":
    sys.exit(main())

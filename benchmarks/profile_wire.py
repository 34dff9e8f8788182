"""What the wire adds to a breakpoint round trip and to a control call, host side: a 512-token prompt paused at
a layer and resumed unchanged at once, embedded and over loopback WebSocket to a server in its own process,
stamped at each hand-off in both processes (`time.perf_counter` is the system's monotonic clock, so the
two processes' stamps compare); and `checkpoint()` / `session_info` over the control socket beside the same
calls over the REST routes (httpx, one kept-alive connection).

    python3 benchmarks/profile_wire.py                  # GPT-2-small shape, float16, on the GPU
    python3 benchmarks/profile_wire.py --device cpu     # the same widths (0.8 MB activations), 2 layers, on the CPU
    python3 benchmarks/profile_wire.py --device cpu --width 64    # 64 KB activations: the part that is not size

The client runs the WebSocket trials twice: first with the process's default allocator settings
(`djinn.connect(url)`, the default), then after `keep_freed_memory()`, which cannot be undone
in a process, so it comes second. Prints per mode the medians of: the engine's Paused event -> the client
has it; the client has it -> the engine runs its resume; and their sum. Then the first mode's Paused event
piece by piece: the server's stream writer takes it, has encoded it, has sent it; the client's websockets
connection hands the frame over, the client has decoded it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import djinn  # noqa: E402
from djinn.allocator import keep_freed_memory  # noqa: E402
from djinn.models.config import ModelConfig  # noqa: E402
from djinn.models.loading import load_random  # noqa: E402
from djinn.wire import unpack  # noqa: E402
from benchmarks.engine_stamps import (STAMPS, dump_on_sigterm, load, paused_before, paused_to_client_ms,  # noqa: E402
                                     served, stamp_engine)

def model(device: str, width: int = 768):
    if device == "cpu":
        cfg = ModelConfig(family="gpt2", vocab_size=1024, d_model=width, n_layers=2, n_heads=width // 64,
                          n_kv_heads=width // 64, d_mlp=4 * width, max_seq_len=1024, tie_embeddings=True)
        return load_random(cfg, torch.float16, torch.device("cpu"), name=f"gpt2-width-{width}"), 1
    cfg = ModelConfig(family="gpt2", vocab_size=50257, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, d_mlp=3072,
                      max_seq_len=1024, tie_embeddings=True)
    return load_random(cfg, torch.float16, torch.device(device), name="gpt2-shape"), 6


PIECES = ("writer has it", "encoded", "sent", "client reads it", "client decoded it")


def stamp_server_frames() -> None:
    """Stamp a Paused event's way through the server: its stream's writer takes it, the frame is encoded
    (msgpack around the safetensors activation), the socket send returns."""
    import djinn.server.sockets as sockets
    import djinn.server.stream as stream

    encode_event, pack, send = stream.encode_event, sockets.pack, sockets.Conn.send

    def encode_event_stamped(ev):
        if isinstance(ev, djinn.Paused):
            STAMPS.append((PIECES[0], time.perf_counter()))
        return encode_event(ev)

    def pack_stamped(frame):
        data = pack(frame)
        if frame.get("type") == "paused":
            STAMPS.append((PIECES[1], time.perf_counter()))
        return data

    async def send_stamped(self, frame):
        await send(self, frame)
        if frame.get("type") == "paused":
            STAMPS.append((PIECES[2], time.perf_counter()))
    stream.encode_event, sockets.pack, sockets.Conn.send = encode_event_stamped, pack_stamped, send_stamped


def stamp_client_frames(stamps: list) -> None:
    """Stamp the client's side of a large frame: the websockets connection hands it over, it is decoded."""
    import djinn.client.remote as remote

    unpack_frame = remote.unpack

    def unpack_stamped(data, *args, **kwargs):
        big = len(data) > 1 << 16
        if big:
            stamps.append((PIECES[3], time.perf_counter()))
        msg = unpack_frame(data, *args, **kwargs)
        if big:
            stamps.append((PIECES[4], time.perf_counter()))
        return msg
    remote.unpack = unpack_stamped


def pieces(server_stamps: list, client_stamps: list, client_got: list[float]) -> dict:
    """Per piece, the median ms from the engine's Paused event to the first stamp of that piece after it."""
    stamps = server_stamps + client_stamps
    paused = [paused_before(server_stamps, got) for got in client_got]
    return {piece: statistics.median((min(t for n, t in stamps if n == piece and t >= p) - p) * 1000 for p in paused)
            for piece in PIECES}


def serve(device: str, width: int, port: int, stamps_path: str) -> None:
    from djinn.server.launch import run

    stamp_engine()
    stamp_server_frames()
    dump_on_sigterm(stamps_path)
    loaded, _ = model(device, width)
    run([loaded], port=port, api_keys=[], kv_memory=2 << 30, log_level="warning")


def round_trips(client, layer: int, trials: int, vocab: int) -> list[tuple[float, float]]:
    """Per trial: (client has Paused, client's resume() returned), on the client's clock."""
    prompt = torch.randint(0, vocab, (512,), generator=torch.Generator().manual_seed(1)).tolist()
    bps = [djinn.Breakpoint(f"blocks.{layer}.hook_resid_post", steps=[0])]
    out = []
    for trial in range(trials + 2):  # two warm-ups
        s = client.session()
        got = None
        for ev in s.stream(prompt, max_new_tokens=1, breakpoints=bps, stop_tokens=[]):
            if isinstance(ev, djinn.Paused):
                got = time.perf_counter()
                ev.resume()
        s.close()
        if trial >= 2:
            out.append(got)
    return out


def hand_offs(engine_stamps: list[tuple[str, float]], client_got: list[float]) -> dict:
    """Medians of engine Paused -> client has it -> engine resume, matching each client stamp to the engine's
    Paused just before it and the resume just after it."""
    resumed = [t for n, t in engine_stamps if n == "resume"]
    to_engine = [(min(t for t in resumed if t >= got) - got) * 1000 for got in client_got]
    to_client = paused_to_client_ms(engine_stamps, client_got)
    return {"paused_to_client_ms": statistics.median(to_client), "client_to_resume_ms": statistics.median(to_engine),
            "sum_ms": statistics.median(x + y for x, y in zip(to_client, to_engine))}


def control_calls(client, url: str, trials: int) -> dict:
    import httpx

    s = client.session()
    s.generate(list(range(1, 64)), max_new_tokens=1, stop_tokens=[])
    http = httpx.Client(base_url=url, headers={"Accept": "application/msgpack"})

    def med(f) -> float:
        xs = []
        for _ in range(trials):
            t = time.perf_counter()
            f()
            xs.append((time.perf_counter() - t) * 1000)
        return statistics.median(xs)
    def checkpoint_after(before) -> float:
        xs = []
        for _ in range(trials):
            before()
            t = time.perf_counter()
            ck = s.checkpoint()
            xs.append((time.perf_counter() - t) * 1000)
            ck.delete()  # within the server's per-key checkpoint limit
        return statistics.median(xs)
    made: list[str] = []
    out = {"checkpoint_after_stream_ms": checkpoint_after(  # as bench.py calls it: right after a stream ended
               lambda: s.generate([], max_new_tokens=1, stop_tokens=[])),
           "checkpoint_after_idle_ms": checkpoint_after(lambda: time.sleep(0.05)),  # as after a user's pause
           "checkpoint_control_socket_ms": med(lambda: made.append(s.checkpoint().id)),
           "checkpoint_rest_ms": med(lambda: made.append(
               unpack(http.post(f"/api/sessions/{s.id}/checkpoint").content)["id"])),
           "session_info_control_socket_ms": med(lambda: s.info()),
           "session_info_rest_ms": med(lambda: http.get(f"/api/sessions/{s.id}").content)}
    for cid in made:
        client._backend.call("delete_checkpoint", cid)
    http.close()
    s.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--trials", type=int, default=15)
    ap.add_argument("--width", type=int, default=768, help="d_model of the CPU model (activations 512 x width)")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--stamps", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        return serve(args.device, args.width, args.port, args.stamps)
    loaded, layer = model(args.device, args.width)
    name = loaded.name
    vocab = loaded.config.vocab_size
    stamp_engine()
    embedded = djinn.connect(model=loaded, kv_memory=2 << 30)
    got = round_trips(embedded, layer, args.trials, vocab)
    results = {"embedded": hand_offs(STAMPS, got)}
    embedded.close()
    del embedded, loaded

    stamps_path = os.path.join(tempfile.mkdtemp(), "server_stamps.json")
    with served([os.path.abspath(__file__), "--serve", "--device", args.device, "--width", str(args.width),
                 "--stamps", stamps_path]) as url:
        client = djinn.connect(url, keep_freed_memory=False)
        client_stamps: list = []
        stamp_client_frames(client_stamps)
        got_default = round_trips(client, layer, args.trials, vocab)
        keep_freed_memory()
        got_kept = round_trips(client, layer, args.trials, vocab)
        results["control"] = control_calls(client, url, 30)
        client.close()
    server = load(stamps_path)
    results["websocket_default_allocator"] = hand_offs(server, got_default)
    results["websocket_keep_freed_memory"] = hand_offs(server, got_kept)
    where = torch.cuda.get_device_name() if args.device != "cpu" else "cpu"
    print(f"{name} (float16) on {where}, 512-token prompt paused at blocks.{layer}.hook_resid_post, "
          f"{args.trials} trials; host hand-offs, medians in ms:")
    print(f"  {'':30s} {'Paused -> client':>17s} {'client -> resume':>17s} {'sum':>8s}")
    for mode in ("embedded", "websocket_default_allocator", "websocket_keep_freed_memory"):
        r = results[mode]
        print(f"  {mode:30s} {r['paused_to_client_ms']:17.3f} {r['client_to_resume_ms']:17.3f} {r['sum_ms']:8.3f}")
    split = pieces(server, client_stamps, got_default)
    print("the Paused event over WebSocket (default allocator), medians in ms after the engine emitted it:")
    print("  " + ", ".join(f"{piece} {split[piece]:.3f}" for piece in PIECES))
    c = results["control"]
    print("control calls, medians of 30, ms (control socket | REST route):")
    print(f"  checkpoint()   {c['checkpoint_control_socket_ms']:.3f} | {c['checkpoint_rest_ms']:.3f}"
          f"   (control socket, right after a stream ended: {c['checkpoint_after_stream_ms']:.3f}, "
          f"after 50 ms idle: {c['checkpoint_after_idle_ms']:.3f})")
    print(f"  session_info   {c['session_info_control_socket_ms']:.3f} | {c['session_info_rest_ms']:.3f}")


if __name__ == "__main__":
    main()

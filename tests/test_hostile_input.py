"""Hostile input: a seeded fuzz of every REST route (JSON and msgpack), the OpenAI routes, the control socket
and the stream socket, with mutated valid bodies and frames (fields dropped, wrong types, numbers no float or
int64 holds, NaN, deep nesting, lone surrogates, random and truncated bytes, wrong extension types, bad
safetensors payloads, frames just past the frame limit), and a regression test for each case it found.

Every input gets a typed 4xx error (never a 5xx, a silent close, a 1011 or a hang), and the server is intact
afterwards: each key's sessions and generations give the tokens they gave before."""
from __future__ import annotations

import json
import math
import os
import random
from collections import Counter
from typing import Any, Optional

import httpx
import msgpack
import pytest
import torch
import websockets.sync.client
from websockets.exceptions import ConnectionClosed

from djinn.errors import ERRORS_BY_CODE
from djinn.server.limits import Limits
from djinn.wire import MAX_DEPTH, PROTOCOL_VERSION, TENSOR_EXT, tensor_to_bytes, unpack
from serverutil import running_server

SEED = int(os.environ.get("DJINN_FUZZ_SEED", "7051"))  # fixed unless asked otherwise
KEYS = ("hostile-key-one", "hostile-key-two")
FRAME_LIMIT = 1 << 20  # small, and room for the deep bodies of the regression tests
LIMITS = Limits(max_frame_bytes=FRAME_LIMIT, max_prompt_tokens=64, max_prompt_chars=512, max_new_tokens=8,
                max_sessions_per_key=4096)
SITE = "blocks.2.hook_resid_post"
D_MODEL = 64
STORY = "Once upon a time"
WAIT = 20.0  # far past any reply on loopback: a recv that waits this long is a hang


@pytest.fixture(scope="module")
def server(stories_path):
    with running_server(stories_path, api_keys=KEYS, limits=LIMITS) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=WAIT) as c:
        yield c


def auth(key: Optional[str]) -> dict:
    return {"Authorization": f"Bearer {key}"} if key else {}


def open_ws(server, path: str, key: Optional[str] = KEYS[0]):
    return websockets.sync.client.connect(server.url.replace("http://", "ws://") + path, proxy=None,
                                          max_size=None, compression=None, open_timeout=WAIT, legacy=True,
                                          additional_headers=auth(key))


def new_session(http, key: str = KEYS[0]) -> str:
    return http.post("/api/sessions", json={}, headers=auth(key)).json()["id"]


def generate_tokens(http, sid: str, prompt: Any = STORY, key: str = KEYS[0], n: int = 8) -> list[int]:
    r = http.post(f"/api/sessions/{sid}/generate", json={"prompt": prompt, "max_new_tokens": n}, headers=auth(key))
    assert r.status_code == 200, r.text
    return r.json()["token_ids"]


def fresh_generate(http, key: str) -> list[int]:
    sid = new_session(http, key)
    tokens = generate_tokens(http, sid, key=key)
    http.delete(f"/api/sessions/{sid}", headers=auth(key))
    return tokens


def next_tokens(http, sid: str, key: str) -> list[int]:
    """What `sid` generates next (in a fork, so that the session itself is untouched)."""
    fork = http.post(f"/api/sessions/{sid}/fork", headers=auth(key)).json()["id"]
    tokens = generate_tokens(http, fork, " and", key)
    http.delete(f"/api/sessions/{fork}", headers=auth(key))
    return tokens


def typed(err: Any) -> bool:
    """A typed error body or frame: a known code other than `internal`, and a message."""
    return (isinstance(err, dict) and err.get("code") in ERRORS_BY_CODE and err["code"] != "internal"
            and isinstance(err.get("message"), str) and bool(err["message"]))


# ---------------------------------------------------------------- hostile values

def deep(n: int, leaf: Any = 0, as_map: bool = False) -> Any:
    for _ in range(n):
        leaf = {"a": leaf} if as_map else [leaf]
    return leaf


def st_blob(header: Any, data: bytes = b"") -> bytes:
    """A safetensors payload with the given header (a map, or raw bytes)."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(h).to_bytes(8, "little") + h + data


def _t(dtype="F32", shape=(1,), offsets=(0, 4)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


BAD_BLOBS = [
    b"", b"\x00" * 8, (1 << 63).to_bytes(8, "little") + b"{}", (100).to_bytes(8, "little") + b"{}",
    st_blob(b"{not json"), st_blob(b"[]"), st_blob({}), st_blob({"x": _t()}, bytes(4)),
    st_blob({"t": _t(shape=[1 << 40])}, bytes(4)), st_blob({"t": _t(shape=[-1])}, bytes(4)),
    st_blob({"t": _t("Q7")}, bytes(4)), st_blob({"t": _t(shape=[2], offsets=[4, 0])}, bytes(8)),
    st_blob({"t": _t("F8_E4M3", [4])}, bytes(4)), st_blob({"t": _t(shape=[1 << 32, 1 << 32], offsets=[0, 0])}),
    st_blob({"t": _t(), "u": _t(offsets=[4, 8])}, bytes(8)), st_blob({"t": _t("U64", [1], [0, 8])}, bytes(8)),
    st_blob({"t": _t(offsets=[0, 1 << 40])}, bytes(4)), st_blob({"t": "F32"}), st_blob({"t": _t(shape=["a"])}),
    st_blob({"__metadata__": {"a": 1}, "t": _t()}, bytes(4)),
]
HUGE_FOR_MSGPACK = [(1 << 64) - 1, 1 << 63, 1 << 31]  # past int64, past int32
HUGE_FOR_JSON = HUGE_FOR_MSGPACK + [10 ** 400, -10 ** 400, -(1 << 63) - 1]  # past any float; below int64
NAMES = ["type", "prompt", "params", "activation", "pause", "site", "vector", "scale", "factor", "tensor",
         "mean", "positions", "steps", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop_tokens",
         "return_logits", "interventions", "breakpoints", "activation_dtype", "model", "text", "ids", "id",
         "method", "args", "max_tokens", "stop", "logprobs", "n", "stream", "stream_options", "djinn_interventions",
         "protocol", "x"]


def rand_tensor(rng: random.Random) -> torch.Tensor:
    shape = rng.choice([[D_MODEL], [1, D_MODEL], [2, D_MODEL], [D_MODEL + 1], [], [0], [3]])
    dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.bool])
    t = torch.randn(shape).to(dtype) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype)
    if dtype.is_floating_point and t.numel() and rng.random() < 0.3:
        t.view(-1)[rng.randrange(t.numel())] = rng.choice([math.nan, math.inf, -math.inf])
    return t


def hostile(rng: random.Random, wire: str, like: Any = None) -> Any:
    """A value a well-behaved client would not send in place of `like` (mostly one of its own kind: a number
    for a number, text for text, ...); `wire`, 'json' or 'msgpack', says what the encoding can carry."""
    huge = HUGE_FOR_JSON if wire == "json" else HUGE_FOR_MSGPACK
    numbers = huge + [math.nan, math.inf, -math.inf, -1, True, "1"]
    texts = ["\ud800", "a\udfffb", STORY + "\udc80", "", "x" * (LIMITS.max_prompt_chars + 1), "all", "\x00",
             "hook_embed", "blocks.*.hook_resid_post", "blocks.0.attn.hook_z", "é" * 40, 7]
    lists = [[], [True] * D_MODEL, ["a"] * D_MODEL, [[0.5] * D_MODEL, [0.5]], [0.5] * (D_MODEL - 1) + [huge[0]],
             [[0.0] * D_MODEL], [0.1] * D_MODEL, [1, [2]], [{}] * 3, list(range(70)), [math.nan] * D_MODEL,
             deep(rng.choice([MAX_DEPTH - 2, MAX_DEPTH, MAX_DEPTH + 1, 200]), rng.choice([0, 1.5, "x"]))]
    maps = [{}, deep(rng.choice([MAX_DEPTH - 1, MAX_DEPTH + 1, 200]), as_map=True), {"type": "x"}]
    wire_only = [b"\xff\x00", {1: 2}, {b"type": "hello"}, {(1, 2): 3}, {None: 1}, rand_tensor(rng),
                 msgpack.ExtType(rng.choice([TENSOR_EXT] * 4 + [0, 2, 5, 127]),
                                 rng.choice(BAD_BLOBS + [rng.randbytes(rng.randint(0, 40))]))]
    kinds = {int: numbers, float: numbers, str: texts, list: lists, dict: maps}
    pool = kinds.get(type(like)) if rng.random() < 0.7 else None
    if pool is None:
        pool = numbers + texts + lists + maps + [None] + (wire_only * 2 if wire == "msgpack" else [])
    return rng.choice(pool)


def mutate(rng: random.Random, v: Any, wire: str) -> Any:
    """`v` with one place in it dropped, replaced by a hostile value, or joined by an unknown field."""
    if isinstance(v, dict) and v and rng.random() < 0.9:
        out, k = dict(v), rng.choice(list(v))
        r = rng.random()
        if r < 0.1:
            del out[k]
        elif r < 0.2:  # (msgpack can name a field with bytes)
            name = rng.choice(NAMES)
            out[name.encode() if wire == "msgpack" and rng.random() < 0.3 else name] = hostile(rng, wire)
        else:
            out[k] = mutate(rng, v[k], wire)
        return out
    if isinstance(v, list) and v and rng.random() < 0.6:
        out, i = list(v), rng.randrange(len(v))
        if rng.random() < 0.2:
            del out[i]
        else:
            out[i] = mutate(rng, v[i], wire)
        return out
    return hostile(rng, wire, v)


def _to_ext(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return msgpack.ExtType(TENSOR_EXT, tensor_to_bytes(obj))
    raise TypeError(type(obj).__name__)


def _to_json(obj: Any) -> Any:
    return obj.tolist() if isinstance(obj, torch.Tensor) else None


def encode(obj: Any, wire: str) -> bytes:
    """`obj` as the bytes of a JSON body (NaN literals, escaped surrogates) or of msgpack (surrogates as the
    invalid UTF-8 they would be)."""
    if wire == "json":
        return json.dumps(obj, default=_to_json).encode()
    return msgpack.packb(obj, default=_to_ext, use_bin_type=True, unicode_errors="surrogatepass")


def raw_bytes(rng: random.Random, valid: bytes) -> bytes:
    """Byte-level damage: random bytes, a valid encoding truncated or flipped, deep nesting no encoder writes,
    number and text literals that JSON's grammar allows but nothing holds."""
    r = rng.random()
    if r < 0.25:
        return rng.randbytes(rng.randint(0, 200))
    if r < 0.55:
        b = bytearray(valid)
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            if op < 0.4 and b:
                b[rng.randrange(len(b))] = rng.randrange(256)
            elif op < 0.7 and b:
                del b[rng.randrange(len(b)):]
            else:
                b[rng.randrange(len(b) + 1):0] = rng.randbytes(rng.randint(1, 8))
        return bytes(b)
    n = rng.choice([MAX_DEPTH + 1, 1000, 100000])
    return rng.choice([b"[" * n, b"[" * n + b"]" * n, b'{"a":' * n, b"\x91" * n, b"\x81\xa1a" * n,
                       b'{"prompt":' + b"[" * n + b"1" + b"]" * n + b"}", b'{"prompt": "\xff\xfe"}',
                       b'{"prompt": "\xed\xa0\x80"}', b'{"prompt": 1' + b"0" * 5000 + b"}", b'{"temperature": 1e999}',
                       b'{"temperature": NaN, "top_p": -Infinity}', json.dumps({"prompt": STORY}).encode("utf-16"),
                       b"\xef\xbb\xbf{}", b"\xc1", b"\x92" + b"\x00" * 3, b"\xdf\xff\xff\xff\xff",
                       b"\x82\xa4type\xa5hello\xa8protocol\xd6\xff\x00\x00\x00\x01",  # a msgpack timestamp
                       b"\x81\xa4type\xc7\x03\xff\x00\x00\x00"])  # a timestamp of a length none has


# ---------------------------------------------------------------- valid bodies and frames, to mutate

def steer(vector: Any = None) -> dict:
    return {"type": "steer", "site": SITE, "vector": [0.1] * D_MODEL if vector is None else vector, "scale": 2.0,
            "positions": None, "steps": "all"}


INTERVENTIONS = [steer(), {"type": "scale", "site": SITE, "factor": 1.0, "positions": [0], "steps": [0, 1]},
                 {"type": "ablate", "site": SITE, "mean": None}, {"type": "capture", "site": SITE, "steps": 0},
                 {"type": "replace", "site": SITE, "tensor": [[0.0] * D_MODEL], "positions": [0]}]


def gen_params() -> dict:
    return {"max_new_tokens": 2, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": 1, "stop_tokens": [2],
            "return_logits": False, "interventions": [dict(x) for x in INTERVENTIONS[:2]],
            "activation_dtype": "float32"}


def rest_routes(sid: str, cid: str) -> list[tuple[str, str, Optional[dict], int]]:
    """Every REST route of app.py and openai.py: (verb, path, a valid body or None for none, how often the fuzz
    picks it: mostly those with many fields)."""
    return [("GET", "/healthz", None, 1), ("GET", "/metrics", None, 1), ("GET", "/api/models", None, 1),
            ("POST", "/api/sessions", {"model": "stories260K"}, 2), ("GET", "/api/sessions", None, 1),
            ("GET", f"/api/sessions/{sid}", None, 1), ("DELETE", f"/api/sessions/{sid}", None, 1),
            ("POST", f"/api/sessions/{sid}/generate", {"prompt": STORY, **gen_params()}, 8),
            ("PUT", f"/api/sessions/{sid}/interventions", {"interventions": [dict(x) for x in INTERVENTIONS]}, 4),
            ("POST", f"/api/sessions/{sid}/resume", {"activation": [[0.0] * D_MODEL], "pause": 0}, 3),
            ("POST", f"/api/sessions/{sid}/cancel", {}, 1), ("POST", f"/api/sessions/{sid}/checkpoint", {}, 1),
            ("POST", f"/api/sessions/{sid}/fork", {}, 1), ("GET", f"/api/checkpoints/{cid}", None, 1),
            ("POST", f"/api/checkpoints/{cid}/restore", {}, 1), ("DELETE", f"/api/checkpoints/{cid}", None, 1),
            ("POST", "/api/tokenize", {"text": STORY, "model": "stories260K"}, 3),
            ("POST", "/api/detokenize", {"ids": [1, 2, 3], "model": "stories260K"}, 2),
            ("POST", "/v1/completions", {"model": "stories260K", "prompt": STORY, "max_tokens": 2, "temperature": 0,
                                         "top_p": 1, "seed": 1, "stop": ["\n"], "logprobs": 1, "n": 1,
                                         "stream": False, "user": "u", "djinn_interventions": [steer()]}, 8),
            ("GET", "/v1/models", None, 1)]


def control_calls(sid: str, cid: str) -> list[tuple[str, list]]:
    return [("models", []), ("create_session", ["stories260K"]), ("list_sessions", []), ("session_info", [sid]),
            ("close_session", [sid]), ("set_interventions", [sid, [dict(x) for x in INTERVENTIONS]]),
            ("resume", [sid, torch.zeros(1, D_MODEL), 0]), ("cancel", [sid]), ("checkpoint", [sid]),
            ("fork", [sid]), ("checkpoint_status", [cid]), ("restore", [cid]), ("delete_checkpoint", [cid]),
            ("tokenize", [STORY, "stories260K"]), ("detokenize", [[1, 2, 3], None])]


def hello(version: Any = PROTOCOL_VERSION) -> bytes:
    return msgpack.packb({"type": "hello", "protocol": version})


JUNK_IDS = ["nope", "", "%ff", "%ED%A0%80", "x" * 1000, "..%2F..%2Fetc", "%00", "a b"]
SENTINEL = b"\xc1"  # never valid msgpack: a server still waiting for a frame answers it with a typed error


# ---------------------------------------------------------------- the fuzz

class Tally:
    def __init__(self):
        self.counts = {"inputs": 0, "http": 0, "ws_frames": 0, "ws_connections": 0, "5xx": 0, "internal": 0,
                       "bad_error_shape": 0, "untyped_connections": 0, "hangs": 0, "accepted": 0}
        self.examples: list[str] = []
        self.codes: Counter = Counter()  # error codes seen, to show what the fuzz reached

    def bad(self, kind: str, what: Any) -> None:
        self.counts[kind] += 1
        if len(self.examples) < 8:
            self.examples.append(f"{kind}: {str(what)[:300]}")

    def http(self, r: httpx.Response, what: Any) -> None:
        self.counts["inputs"] += 1
        self.counts["http"] += 1
        if r.status_code >= 500:
            return self.bad("5xx", (what, r.status_code, r.text))
        if r.status_code >= 400:
            try:
                err = r.json()["error"]
            except Exception:
                return self.bad("bad_error_shape", (what, r.status_code, r.text))
            if not typed(err):
                return self.bad("bad_error_shape", (what, r.status_code, err))
            self.codes[err["code"]] += 1
            return
        self.counts["accepted"] += 1
        if r.headers.get("content-type", "").startswith("text/event-stream"):  # errors travel inside the stream
            for line in r.text.splitlines():
                if line.startswith("data: {") and '"error"' in line:
                    err = json.loads(line[6:])["error"]
                    if not typed(err) or err["message"].startswith("stream failed"):
                        self.bad("internal", (what, err))


def ws_frame_verdict(msg: dict, tally: Tally, what: Any) -> None:
    """An error frame, or a reply that is not ok, must carry a typed error."""
    if msg.get("type") == "error" or msg.get("ok") is False:
        tally.codes[msg.get("code")] += 1
        if not typed(msg):
            tally.bad("internal", (what, msg))


def fresh_socket(server, tally: Tally, path: str, frames: list, key: Optional[str], what: Any) -> None:
    """Send `frames` (then the sentinel) on a new socket and read it to its end: it must say why it stops
    (a typed error frame) or answer (a reply, or a generation that ends in done)."""
    tally.counts["ws_connections"] += 1
    tally.counts["ws_frames"] += len(frames)
    answered = False
    try:
        with open_ws(server, path, key) as ws:
            for f in frames + [SENTINEL]:
                try:
                    ws.send(f)
                except ConnectionClosed:  # it already answered and closed: read why
                    break
            while True:
                msg = unpack(ws.recv(timeout=WAIT))
                ws_frame_verdict(msg, tally, what)
                kind = msg.get("type")
                if kind == "paused":  # a fuzzed generate that was valid, breakpoints and all
                    ws.send(msgpack.packb({"type": "cancel"}))
                elif (kind == "error" and typed(msg)) or kind == "done":
                    answered = True
                    if path == "/api/control" or kind == "done":
                        break
                elif kind == "reply":
                    answered = True
                    if path == "/api/control" and msg.get("ok") is False and msg.get("code") == "malformed_frame" \
                            and msg.get("id") is None:  # the sentinel's reply: everything before it is answered
                        break
    except TimeoutError:
        return tally.bad("hangs", what)
    except ConnectionClosed as e:
        if e.rcvd is not None and e.rcvd.code == 1011:
            return tally.bad("untyped_connections", (what, "closed with 1011"))
    if not answered:
        tally.bad("untyped_connections", (what, "closed without a typed error"))


class PausedStream:
    """A stream of key 0 paused at a breakpoint at every step, re-opened whenever a fuzzed frame ends it."""

    def __init__(self, server, http):
        self.server, self.http, self.ws, self.sid = server, http, None, None

    def open(self) -> None:
        self.close()
        self.sid = new_session(self.http)
        self.ws = open_ws(self.server, f"/api/sessions/{self.sid}/stream")
        self.ws.send(hello())
        self.ws.send(msgpack.packb({"type": "generate", "prompt": STORY, "params": {
            "max_new_tokens": 8, "breakpoints": [{"type": "breakpoint", "site": SITE, "steps": "all"}]}}))
        assert self.wait("paused") == "paused"

    def wait(self, *kinds: str) -> str:
        while True:
            kind = unpack(self.ws.recv(timeout=WAIT))["type"]
            if kind in kinds or kind in ("done", "error"):
                return kind

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close()
            self.http.delete(f"/api/sessions/{self.sid}", headers=auth(KEYS[0]))
        self.ws = None

    def send(self, tally: Tally, frame: bytes, what: Any) -> None:
        """One fuzzed frame: it must get a reply (ok, or not ok with a typed error), the stream carrying on."""
        tally.counts["ws_frames"] += 1
        tally.counts["inputs"] += 1
        ended = paused = False
        try:
            self.ws.send(frame)
            while True:
                msg = unpack(self.ws.recv(timeout=WAIT))
                kind = msg.get("type")
                paused |= kind == "paused"
                ended |= kind in ("done", "error")
                if kind == "reply":
                    break
            ws_frame_verdict(msg, tally, what)
            if msg["ok"]:  # a valid resume or cancel: the stream went on to its next pause or its end
                tally.counts["accepted"] += 1
                if not (paused or ended):
                    ended = self.wait("paused") != "paused"
        except TimeoutError:
            tally.bad("hangs", what)
            ended = True
        except ConnectionClosed as e:
            tally.bad("untyped_connections", (what, f"closed mid-stream ({e})"))
            ended = True
        if ended:
            self.open()


class Fuzz:
    """The fuzz's state: its random source and tally, and the sessions and checkpoints it aims at."""

    def __init__(self, server, http, victims: dict, checkpoints: list):
        self.server, self.http, self.victims, self.checkpoints = server, http, victims, checkpoints
        self.rng, self.tally = random.Random(SEED), Tally()

    def key(self) -> Optional[str]:
        return self.rng.choice([KEYS[0]] * 5 + [KEYS[1]] * 3 + [None, "not-a-key"])

    def target(self, key: Optional[str]) -> tuple[str, str]:
        """A session and a checkpoint to aim at: the caller's own, another key's, or none at all."""
        rng = self.rng
        if rng.random() < 0.15:
            return rng.choice(JUNK_IDS), rng.choice(JUNK_IDS)
        k = key if key in KEYS and rng.random() < 0.8 else rng.choice(KEYS)
        if rng.random() < 0.05:  # the fuzz may close them: top up
            self.victims[k].append(new_session(self.http, k))
        return rng.choice(self.victims[k][-3:]), rng.choice(self.checkpoints)

    def frame(self, valid: dict) -> Any:
        """A fuzzed socket frame from a valid one: mutated, damaged, just past the limit, or text."""
        rng, r = self.rng, self.rng.random()
        if r < 0.6:
            return encode(mutate(rng, valid, "msgpack"), "msgpack")
        if r < 0.85:
            return raw_bytes(rng, encode(valid, "msgpack"))
        if r < 0.95:
            return bytes(FRAME_LIMIT + rng.randint(1, 64))
        return rng.choice(["a text frame", json.dumps(valid, default=_to_json)])

    def rest(self, n: int) -> None:
        """Every route, JSON and msgpack: mutated bodies, damaged bytes, bodies past the limit, odd headers."""
        rng = self.rng
        for i in range(n):
            key = self.key()
            routes = rest_routes(*self.target(key))
            verb, path, body, _ = rng.choices(routes, [w for *_, w in routes])[0]
            wire = rng.choice(["json", "msgpack"])
            headers = {**auth(key), "Content-Type": f"application/{wire}"}
            valid = encode({} if body is None else body, wire)
            r = rng.random()
            if body is None and r < 0.5:
                content = b""
            elif r < 0.7:
                for _ in range(rng.randint(1, 2)):
                    body = mutate(rng, {} if body is None else body, wire)
                content = encode(body, wire)
            elif r < 0.86:
                content = raw_bytes(rng, valid)
            elif r < 0.93:
                content = valid + b" " * (FRAME_LIMIT + 1 - len(valid) + rng.randint(0, 64))
                if rng.random() < 0.5:  # chunked, so that no Content-Length tells the size beforehand
                    content = iter([content[:100], content[100:]])
            else:
                content = valid
                headers.update(rng.choice([
                    {"X-Djinn-Protocol": rng.choice(["99", "", "1.0", "x" * 200])},
                    {"Content-Type": rng.choice(["text/plain", "APPLICATION/MSGPACK", "application/msgpack; q=1", ""])},
                    {"Accept": "application/msgpack"}, {"X-API-Key": b"\xe9t\xe9"},
                    {"Authorization": rng.choice(["Basic abc", "Bearer", "bearer x y"])}]))
                if rng.random() < 0.3:
                    verb = rng.choice(["PATCH", "PUT", "GET", "POST", "DELETE"])
            what = (i, verb, path, content[:80] if isinstance(content, bytes) else "chunked")
            try:
                self.tally.http(self.http.request(verb, path, content=content, headers=headers), what)
            except httpx.TimeoutException:
                self.tally.counts["inputs"] += 1
                self.tally.bad("hangs", what)

    def control(self, n_fresh: int, n_calls: int) -> None:
        """The first frames of fresh control sockets, then many calls on one socket of each key."""
        rng, tally = self.rng, self.tally
        for i in range(n_fresh):
            key = self.key()
            method, args = rng.choice(control_calls(*self.target(key)))
            call = encode(mutate(rng, {"type": "call", "id": i, "method": method, "args": args}, "msgpack"), "msgpack")
            frames = rng.choice([[call], [hello(), call], [raw_bytes(rng, hello())],
                                 [encode(mutate(rng, {"type": "hello", "protocol": 1}, "msgpack"), "msgpack")]])
            tally.counts["inputs"] += 1
            fresh_socket(self.server, tally, "/api/control", frames, key, ("control first", i, frames))
        for key in KEYS:
            with open_ws(self.server, "/api/control", key) as ws:
                ws.send(hello())
                assert unpack(ws.recv(timeout=WAIT))["type"] == "hello"
                tally.counts["ws_connections"] += 1
                for i in range(n_calls):
                    method, args = rng.choice(control_calls(*self.target(key)))
                    frame = self.frame({"type": "call", "id": i, "method": method, "args": args})
                    tally.counts["inputs"] += 1
                    tally.counts["ws_frames"] += 1
                    try:
                        ws.send(frame)
                        msg = unpack(ws.recv(timeout=WAIT))
                    except TimeoutError:
                        tally.bad("hangs", ("control", i, frame))
                        break
                    except ConnectionClosed as e:
                        tally.bad("untyped_connections", ("control", i, frame, e))
                        break
                    if msg.get("type") != "reply":
                        tally.bad("untyped_connections", ("control", i, frame, msg))
                    ws_frame_verdict(msg, tally, ("control", i, frame))
                    tally.counts["accepted"] += bool(msg.get("ok"))

    def stream(self, n_fresh: int, n_paused: int) -> None:
        """The first frames of fresh streams, then frames in the middle of a paused one."""
        rng, tally = self.rng, self.tally
        for i in range(n_fresh):
            key = self.key()
            sid = new_session(self.http) if rng.random() < 0.8 else rng.choice(self.victims[rng.choice(KEYS)])
            valid = {"type": "generate", "prompt": STORY, "params": gen_params()}
            if rng.random() < 0.3:
                valid["params"]["breakpoints"] = [{"type": "breakpoint", "site": SITE, "steps": [0]}]
            if rng.random() < 0.1:
                frames = [encode(mutate(rng, {"type": "hello", "protocol": PROTOCOL_VERSION}, "msgpack"), "msgpack")]
            else:
                frames = [hello(), self.frame(valid)]
            tally.counts["inputs"] += 1
            fresh_socket(self.server, tally, f"/api/sessions/{sid}/stream", frames, key, ("stream first", i, frames))
            self.http.delete(f"/api/sessions/{sid}", headers=auth(KEYS[0]))
        stream = PausedStream(self.server, self.http)
        stream.open()
        for i in range(n_paused):
            frame = self.frame(rng.choice([{"type": "resume", "activation": torch.zeros(1, D_MODEL), "pause": None},
                                           {"type": "resume", "activation": None}, {"type": "cancel"}]))
            stream.send(tally, frame, ("stream mid", i, frame))
        stream.close()


def test_fuzz_every_route_and_socket(server, http):
    torch.manual_seed(SEED)
    # before: what a fresh generate gives for each key, and a session of each key with history
    baseline = {k: fresh_generate(http, k) for k in KEYS}
    held = {k: new_session(http, k) for k in KEYS}
    for k, sid in held.items():
        generate_tokens(http, sid, "The dog", k, 5)
    expected_next = {k: next_tokens(http, held[k], k) for k in KEYS}
    victims = {k: [new_session(http, k) for _ in range(3)] for k in KEYS}
    checkpoints = [http.post(f"/api/sessions/{victims[k][0]}/checkpoint", headers=auth(k)).json()["id"] for k in KEYS]

    fuzz = Fuzz(server, http, victims, checkpoints)
    fuzz.rest(2400)
    fuzz.control(120, 200)
    fuzz.stream(160, 300)

    # after: every key's sessions as they were, and its generations the same
    for k in KEYS:
        for s in http.get("/api/sessions", headers=auth(k)).json():
            if s["id"] != held[k]:
                http.delete(f"/api/sessions/{s['id']}", headers=auth(k))
    intact = {k: (http.get(f"/api/sessions/{held[k]}", headers=auth(k)).json()["state"] == "idle"
                  and next_tokens(http, held[k], k) == expected_next[k] and fresh_generate(http, k) == baseline[k])
              for k in KEYS}
    counts = fuzz.tally.counts
    print(f"\nhostile-input fuzz (seed {SEED}): {counts}\nerror codes: {dict(fuzz.tally.codes.most_common())}")
    report = f"{counts}; intact per key: {intact}; first failures: {fuzz.tally.examples}"
    assert counts["inputs"] >= 3000, report
    assert counts["5xx"] == counts["internal"] == counts["bad_error_shape"] == 0, report
    assert counts["untyped_connections"] == counts["hangs"] == 0, report
    assert all(intact.values()), report


# ---------------------------------------------------------------- regressions: each case, over REST and the stream

@pytest.fixture(scope="module")
def reference(http) -> dict:
    return {k: fresh_generate(http, k) for k in KEYS}


@pytest.fixture()
def sid(http, reference):
    """A session of key 0; after the test, every key still generates what it did."""
    s = new_session(http)
    yield s
    assert http.get(f"/api/sessions/{s}", headers=auth(KEYS[0])).json()["state"] == "idle"
    http.delete(f"/api/sessions/{s}", headers=auth(KEYS[0]))
    assert {k: fresh_generate(http, k) for k in KEYS} == reference


def post(http, path: str, content: bytes, ctype: str = "application/json") -> httpx.Response:
    return http.post(path, content=content, headers={**auth(KEYS[0]), "Content-Type": ctype})


def assert_error(r: httpx.Response, status: int, code: str, text: str = "") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert typed(err) and err["code"] == code and text in err["message"] and len(err["message"]) < 400, err
    return err


def stream_error(server, sid: str, *frames: bytes) -> dict:
    """The frame a stream answers `frames` with (after its hello): the error that ends it, or a reply."""
    with open_ws(server, f"/api/sessions/{sid}/stream") as ws:
        for f in frames:
            try:
                ws.send(f)
            except ConnectionClosed:
                break
        while True:
            msg = unpack(ws.recv(timeout=WAIT))
            if msg["type"] in ("error", "reply"):
                return msg
            assert msg["type"] == "hello", msg


def generate_frame(prompt: Any = STORY, **params) -> bytes:
    return encode({"type": "generate", "prompt": prompt, "params": params}, "msgpack")


def with_literal(body: dict, literal: bytes) -> bytes:
    """`body` as JSON with the literal (a number no encoder writes, NaN, ...) in place of the string "X"."""
    return json.dumps(body).encode().replace(b'"X"', literal)


@pytest.mark.parametrize("body", [b"[" * 100000, b'{"a":' * 100000, b'{"prompt":' + b"[" * 100000 + b"]" * 100000
                                  + b"}", b'{"prompt": ' + b"[" * 200 + b"]" * 200 + b"}"],
                         ids=["arrays", "objects", "in-a-field", "200-levels"])
def test_deep_json_is_a_malformed_frame(http, sid, body):
    assert_error(post(http, f"/api/sessions/{sid}/generate", body), 400, "malformed_frame", f"{MAX_DEPTH} levels")


def test_json_depth_limit_counts_only_brackets_outside_strings(http, sid):
    at_limit = b'{"prompt":' + b"[" * (MAX_DEPTH - 1) + b"1" + b"]" * (MAX_DEPTH - 1) + b"}"  # 64 levels: decoded
    assert_error(post(http, f"/api/sessions/{sid}/generate", at_limit), 400, "invalid_request", "token ids")
    past = b'{"prompt":' + b"[" * MAX_DEPTH + b"1" + b"]" * MAX_DEPTH + b"}"
    assert_error(post(http, f"/api/sessions/{sid}/generate", past), 400, "malformed_frame")
    r = post(http, "/api/tokenize", json.dumps({"text": "[{" * 100 + '\\"[' * 50}).encode())
    assert r.status_code == 200 and r.json()["ids"]


@pytest.mark.parametrize("body", [b"\x91" * 100000, b"\x81\xa6prompt" + b"\x91" * 100000 + b"\x00",
                                  b"\x81\xa1a" * 100000 + b"\x00", b"\x91" * (MAX_DEPTH + 1) + b"\x00"],
                         ids=["arrays", "in-a-field", "maps", "just-past"])
def test_deep_msgpack_is_a_malformed_frame(server, http, sid, body):
    assert_error(post(http, f"/api/sessions/{sid}/generate", body, "application/msgpack"), 400, "malformed_frame")
    for frames in ([body], [hello(), body]):  # the first frame, or the generate frame, of a stream
        msg = stream_error(server, sid, *frames)
        assert msg["type"] == "error" and msg["code"] == "malformed_frame", msg
    assert stream_error(server, sid, hello(), generate_frame(deep(MAX_DEPTH - 2)))["code"] == "invalid_request"


def test_deep_msgpack_during_a_stream_gets_a_reply(server, http, sid):
    stream = PausedStream(server, http)
    stream.open()
    for frame in (b"\x91" * 100000, msgpack.packb({"type": "resume", "activation": deep(MAX_DEPTH)})):
        stream.ws.send(frame)
        msg = unpack(stream.ws.recv(timeout=WAIT))
        assert msg["type"] == "reply" and msg["ok"] is False and msg["code"] == "malformed_frame", msg
    stream.ws.send(msgpack.packb({"type": "resume", "activation": None}))
    assert stream.wait("reply") == "reply"
    stream.close()


def test_map_keys_that_are_not_text(server, http, sid):
    body = msgpack.packb({"prompt": STORY, b"x": 1, "y": 2})
    assert_error(post(http, f"/api/sessions/{sid}/generate", body, "application/msgpack"), 400, "malformed_frame",
                 "keys")
    assert stream_error(server, sid, hello(), body)["code"] == "malformed_frame"


BIG = b"1" + b"0" * 400  # 10**400: valid JSON, beyond any float and any int64


U64 = b"18446744073709551615"  # 2**64 - 1: past int64
NUMBER_CASES = [(f, n, lit) for f in ("temperature", "top_p", "top_k", "seed", "max_new_tokens")
                for n, lit in (("big", BIG), ("-big", b"-" + BIG))] + [
    ("top_k", "u64", U64), ("seed", "u64", U64), ("max_new_tokens", "u64", U64), ("temperature", "nan", b"NaN"),
    ("temperature", "inf", b"Infinity"), ("top_p", "nan", b"NaN"), ("top_p", "-inf", b"-Infinity")]


@pytest.mark.parametrize("field,name,literal", NUMBER_CASES, ids=[f"{f}-{n}" for f, n, _ in NUMBER_CASES])
def test_unrepresentable_generate_numbers(http, sid, field, name, literal):
    body = with_literal({"prompt": "Once", "max_new_tokens": 2, field: "X"}, literal)
    assert_error(post(http, f"/api/sessions/{sid}/generate", body), 400, "invalid_request", field)


@pytest.mark.parametrize("literal", [BIG, b"NaN", b"-Infinity"], ids=["big", "nan", "-inf"])
@pytest.mark.parametrize("kind,field", [("steer", "scale"), ("scale", "factor")])
def test_unrepresentable_intervention_numbers(http, sid, kind, field, literal):
    item = {"type": kind, "site": SITE, field: "X", **({"vector": [0.1] * D_MODEL} if kind == "steer" else {})}
    body = with_literal({"prompt": "Once", "max_new_tokens": 2, "interventions": [item]}, literal)
    assert_error(post(http, f"/api/sessions/{sid}/generate", body), 400, "invalid_request", f"'{field}'")
    r = http.put(f"/api/sessions/{sid}/interventions", content=with_literal({"interventions": [item]}, literal),
                 headers=auth(KEYS[0]))
    assert_error(r, 400, "invalid_request", f"'{field}'")


@pytest.mark.parametrize("field,value", [("top_k", (1 << 64) - 1), ("seed", (1 << 64) - 1), ("seed", 1 << 63),
                                         ("max_new_tokens", (1 << 64) - 1), ("top_k", 1 << 31),
                                         ("temperature", math.nan), ("top_p", math.inf)])
def test_unrepresentable_numbers_over_msgpack_and_the_stream(server, http, sid, field, value):
    body = msgpack.packb({"prompt": "Once", "max_new_tokens": 2, field: value})
    assert_error(post(http, f"/api/sessions/{sid}/generate", body, "application/msgpack"), 400, "invalid_request",
                 field)
    msg = stream_error(server, sid, hello(), generate_frame("Once", **{"max_new_tokens": 2, field: value}))
    assert msg["type"] == "error" and msg["code"] == "invalid_request" and field in msg["message"], msg


def test_unrepresentable_intervention_numbers_over_the_stream(server, sid):
    for item in ({"type": "steer", "site": SITE, "vector": torch.ones(D_MODEL), "scale": math.nan},
                 {"type": "scale", "site": SITE, "factor": -math.inf}):
        msg = stream_error(server, sid, hello(), generate_frame(interventions=[item]))
        assert msg["type"] == "error" and msg["code"] == "invalid_request" and "finite" in msg["message"], msg


@pytest.mark.parametrize("field,literal", [("temperature", BIG), ("top_p", BIG), ("seed", b"18446744073709551616"),
                                           ("max_tokens", BIG), ("temperature", b"NaN"), ("top_p", b"Infinity")],
                         ids=["temperature-big", "top_p-big", "seed-2**64", "max_tokens-big", "temperature-nan",
                              "top_p-inf"])
def test_unrepresentable_openai_numbers(http, field, literal):
    body = with_literal({"model": "stories260K", "prompt": "Once", "max_tokens": 2, field: "X"}, literal)
    assert assert_error(post(http, "/v1/completions", body), 400, "invalid_request", field)["param"] == field


@pytest.mark.parametrize("route,body", [
    ("generate", {"prompt": "\ud800", "max_new_tokens": 2}), ("generate", {"prompt": "Once \udfff upon"}),
    ("/api/tokenize", {"text": "\ud800"}), ("/v1/completions", {"prompt": "\ud800", "max_tokens": 2}),
    ("/v1/completions", {"prompt": ["ok", "x\udc80"], "max_tokens": 2}),
    ("/v1/completions", {"prompt": "Once", "max_tokens": 2, "stop": "\ud800"}),
    ("generate", {"prompt": "Once", "interventions": [{"type": "capture", "site": "\ud800"}]})],
    ids=["prompt", "prompt-middle", "tokenize", "openai-prompt", "openai-prompts", "openai-stop", "site"])
def test_lone_surrogates_in_text(http, sid, route, body):
    path = f"/api/sessions/{sid}/generate" if route == "generate" else route
    assert_error(post(http, path, json.dumps(body).encode()), 400, "invalid_request", "not valid Unicode")


def test_surrogates_as_raw_bytes(server, http, sid):
    """Encoded as UTF-8 bytes (which UTF-8 forbids) a surrogate is not text at all: a malformed body or frame."""
    assert_error(post(http, f"/api/sessions/{sid}/generate", b'{"prompt": "\xed\xa0\x80"}'), 400, "malformed_frame")
    assert_error(post(http, f"/api/sessions/{sid}/generate", encode({"prompt": "\ud800"}, "msgpack"),
                      "application/msgpack"), 400, "malformed_frame")
    assert stream_error(server, sid, hello(), generate_frame("\ud800"))["code"] == "malformed_frame"


HUGE_VECTOR = [0.1] * (D_MODEL - 1) + [10 ** 400]  # (JSON only: msgpack has no such integer)


@pytest.mark.parametrize("vector", [[[0.1] * D_MODEL, [0.1]], [True] * D_MODEL, ["a"] * D_MODEL, HUGE_VECTOR,
                                    deep(MAX_DEPTH - 4, True), [[0.1], 0.1], [None] * D_MODEL, {"a": 1}, "zeros", 0.5],
                         ids=["ragged", "bools", "strings", "huge", "deep", "mixed", "nulls", "map", "text", "number"])
def test_bad_tensor_lists(server, http, sid, vector):
    body = json.dumps({"prompt": "Once", "max_new_tokens": 2, "interventions": [steer(vector)]}).encode()
    assert_error(post(http, f"/api/sessions/{sid}/generate", body), 400, "invalid_tensor", "'vector'")
    r = post(http, f"/api/sessions/{sid}/resume", json.dumps({"activation": vector}).encode())
    assert_error(r, 400, "invalid_tensor", "activation")
    if vector is not HUGE_VECTOR:
        msg = stream_error(server, sid, hello(), generate_frame("Once", interventions=[steer(vector)]))
        assert msg["type"] == "error" and msg["code"] == "invalid_tensor", msg


@pytest.mark.parametrize("blob", BAD_BLOBS, ids=[f"blob{i}" for i in range(len(BAD_BLOBS))])
def test_bad_safetensors_payloads(server, http, sid, blob):
    item = {"type": "steer", "site": SITE, "vector": msgpack.ExtType(TENSOR_EXT, blob)}
    body = msgpack.packb({"prompt": "Once", "max_new_tokens": 2, "interventions": [item]})
    assert_error(post(http, f"/api/sessions/{sid}/generate", body, "application/msgpack"), 400, "invalid_tensor")
    msg = stream_error(server, sid, hello(), generate_frame("Once", max_new_tokens=2, interventions=[item]))
    assert msg["type"] == "error" and msg["code"] == "invalid_tensor", msg


def test_error_messages_quote_values_briefly(http, sid):
    """A caller's value in an error message is its type or a short preview, never its repr at any length."""
    for prompt in (deep(MAX_DEPTH - 2), ["x" * 10000], [[0] * 5000]):
        r = post(http, f"/api/sessions/{sid}/generate", json.dumps({"prompt": prompt}).encode())
        assert_error(r, 400, "invalid_request", "token ids")

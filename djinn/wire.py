"""The wire format shared by the server and the remote clients.

Frames (WebSocket messages, and REST bodies sent as `application/msgpack`) are msgpack maps. A tensor is a
msgpack extension value (type `TENSOR_EXT`) whose payload is a safetensors file holding exactly one tensor
named "t", so every dtype travels exactly, bfloat16 included. JSON bodies (simple control calls, the
OpenAI-compatible routes) may give tensors as nested lists of numbers instead.

Interventions and breakpoints are plain data: `{"type": "steer", "site": ..., "vector": <tensor>, ...}`.
The decoder accepts only the known kinds and fields, checks every type, and raises a typed `DjinnError`
for anything else; nothing a client sends is ever executed.

Every decoded frame or body is at most `MAX_DEPTH` lists and maps deep, and its map keys are text, so that
no later step (validation, error messages, replies) recurses over a caller's value. JSON is checked before it
is parsed; msgpack, whose C decoder has its own bounded stack, right after.

This module needs only msgpack, safetensors and torch, so the client can import it without the server's
dependencies.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from typing import Any, Callable, Optional

import msgpack
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import (DjinnError, FrameTooLarge, InvalidRequest, InvalidTensor, LimitExceeded, MalformedFrame,
                     error_from_code)
from .events import Done, Error, GenerateResult, ModelInfo, ParameterInfo, Paused, Token, TopTokens
from .interventions import Ablate, Breakpoint, Capture, LogitLens, Replace, Scale, Steer
from .sites import SiteInfo
from .validation import INT64_MAX, shown, integer, number, text

PROTOCOL_VERSION = 1
TENSOR_EXT = 1
MSGPACK = "application/msgpack"
PROTOCOL_HEADER = "X-Djinn-Protocol"
MAX_DEPTH = 64  # lists and maps nested in one frame or body; Djinn's own frames need fewer than 8

# The dtypes a tensor may have on the wire, by their safetensors names. (Integer tensors decode too, so that
# the engine can say "must be floating-point".)
WIRE_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
               torch.bool: "BOOL"}


# ---------------------------------------------------------------- tensors and frames

def tensor_to_bytes(t: torch.Tensor) -> bytes:
    """`t` as a safetensors file holding one tensor "t": the little-endian header length, the JSON header
    padded to 8 bytes, the raw data; the same bytes safetensors.torch.save writes (tests read them back with
    the library), in one copy of the data. A paused activation is encoded on the server's event loop while
    the client waits: for a 0.8 MB one this took encoding from 0.57-0.59 to 0.31-0.36 ms in a server on
    the CPU machine (benchmarks/results/profile_wire_cpu.txt)."""
    t = t.detach().to("cpu").contiguous()
    if t.dtype not in WIRE_DTYPES:
        raise TypeError(f"tensor dtype {t.dtype} is not accepted on the wire")
    if sys.byteorder != "little":  # the file's data is little-endian: the library swaps the bytes
        return st_save({"t": t})
    data = t.reshape(-1).view(torch.uint8).numpy()
    header = json.dumps({"t": {"dtype": WIRE_DTYPES[t.dtype], "shape": list(t.shape),
                               "data_offsets": [0, data.nbytes]}}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return b"".join((len(header).to_bytes(8, "little"), header, data))


def tensor_from_bytes(data: bytes) -> torch.Tensor:
    try:
        tensors = st_load(bytes(data))
    except Exception as e:  # safetensors raises its own error types for corrupt headers and sizes
        raise InvalidTensor(f"tensor payload is not a valid safetensors blob ({type(e).__name__}: {e})") from None
    if set(tensors) != {"t"}:
        raise InvalidTensor(f"a tensor payload must hold exactly one tensor named 't', got {sorted(tensors)}")
    t = tensors["t"]
    if t.dtype not in WIRE_DTYPES:
        raise InvalidTensor(f"tensor dtype {t.dtype} is not accepted on the wire")
    return t


def _default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return msgpack.ExtType(TENSOR_EXT, tensor_to_bytes(obj))
    if isinstance(obj, (tuple, set, frozenset, range)):
        return list(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    raise TypeError(f"cannot send a {type(obj).__name__} over the wire")


def _ext_hook(code: int, data: bytes) -> Any:
    if code != TENSOR_EXT:
        raise MalformedFrame(f"unknown msgpack extension type {code}")
    return tensor_from_bytes(data)


def pack(obj: Any) -> bytes:
    """Encode a frame. Raises InvalidRequest for values that cannot travel (never sends pickles or code)."""
    try:
        return msgpack.packb(obj, default=_default, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise InvalidRequest(f"cannot encode this value for the wire: {e}") from None


def unpack(data: bytes, max_bytes: Optional[int] = None) -> Any:
    """Decode a frame; anything that is not one well-formed msgpack value of at most MAX_DEPTH levels, with
    text map keys, raises MalformedFrame."""
    if max_bytes is not None and len(data) > max_bytes:
        raise FrameTooLarge(f"frame of {len(data)} bytes exceeds the limit of {max_bytes} bytes")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MalformedFrame("frames must be binary msgpack")
    try:
        obj = msgpack.unpackb(data, raw=False, ext_hook=_ext_hook, strict_map_key=True,
                              use_list=True)
    except DjinnError:
        raise
    except msgpack.StackError:
        raise MalformedFrame(f"frame nests lists and maps more than {MAX_DEPTH} levels deep") from None
    except Exception as e:  # ExtraData, FormatError, UnicodeDecodeError, ValueError, ...
        raise MalformedFrame(f"frame is not valid msgpack ({type(e).__name__})") from None
    _check_nesting(obj)
    return obj


_CONTAINERS = (list, dict)


def _check_nesting(obj: Any) -> None:
    """MAX_DEPTH levels of lists and maps at most, and only text map keys; level by level, never recursive."""
    level = [obj] if type(obj) in _CONTAINERS else []
    for _ in range(MAX_DEPTH):
        if not level:
            return
        inner = []
        for v in level:
            if type(v) is dict:
                if not all(type(k) is str for k in v):
                    raise MalformedFrame("map keys must be text")
                v = v.values()
            inner += [x for x in v if type(x) in _CONTAINERS]
        level = inner
    if level:
        raise MalformedFrame(f"frame nests lists and maps more than {MAX_DEPTH} levels deep")


_BRACKETS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 opens, -1 (as int8) closes
_NOT_STRUCTURE = bytes(set(range(256)) - set(b'[]{}"'))


def _json_depth(raw: bytes) -> int:
    """How deep arrays and objects nest in a UTF-8 JSON text, from its brackets outside strings: the depth
    the parser would reach, found without parsing (and before it can fail for other reasons)."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_DEPTH:
        return 0
    s = re.sub(rb"\\.", b"", raw, flags=re.S).translate(None, _NOT_STRUCTURE)  # escapes, then all but [{"}]
    s = re.sub(rb'"[^"]*"', b"", s).replace(b'"', b"")  # strings, then an unterminated one's quote
    if not s:
        return 0
    steps = torch.frombuffer(bytearray(s.translate(_BRACKETS)), dtype=torch.int8)
    depth = top = 0
    for chunk in steps.split(1 << 20):  # in pieces: a running sum over the whole body could be large
        run = chunk.cumsum(0, dtype=torch.int32) + depth
        top, depth = max(top, int(run.max())), int(run[-1])
    return top


def decode_json(raw: bytes) -> Any:
    """A UTF-8 JSON body of at most MAX_DEPTH levels (checked before parsing); MalformedFrame otherwise."""
    try:
        doc = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise MalformedFrame("a JSON body must be UTF-8 text") from None
    if _json_depth(raw) > MAX_DEPTH:
        raise MalformedFrame(f"body nests arrays and objects more than {MAX_DEPTH} levels deep")
    try:
        return json.loads(doc)
    except (ValueError, RecursionError):
        raise MalformedFrame("request body is not valid JSON (send application/json or "
                             "application/msgpack)") from None


def unpack_map(data: bytes, max_bytes: Optional[int] = None) -> dict:
    obj = unpack(data, max_bytes)
    if not isinstance(obj, dict):
        raise MalformedFrame(f"a frame must be a map, got {type(obj).__name__}")
    return obj


def _finite_or_none(x: Any) -> Any:
    if isinstance(x, list):
        return [_finite_or_none(v) for v in x]
    return x if math.isfinite(x) else None


def tensor_to_json(t: torch.Tensor) -> dict:
    """{dtype, shape, data} for JSON replies (NaN and Inf, which JSON cannot carry, become null)."""
    t = t.detach().to("cpu")
    data = t.to(torch.float64 if t.is_floating_point() else t.dtype).tolist()
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        data = _finite_or_none(data)
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "data": data}


def jsonable(obj: Any) -> Any:
    """The same structure with tensors as {dtype, shape, data} and tuples as lists (for JSON responses)."""
    if isinstance(obj, torch.Tensor):
        return tensor_to_json(obj)
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, bytes):
        return None
    return obj


# ---------------------------------------------------------------- field validation

_MISSING = object()


def _fail(what: str, expected: str, value: Any) -> DjinnError:
    return InvalidRequest(f"{what} must be {expected}, got {shown(value)}")


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def int_list(v: Any, what: str, max_items: int, lo: int = -INT64_MAX - 1, hi: int = INT64_MAX) -> list[int]:
    if not isinstance(v, (list, tuple)):
        raise _fail(what, "a list of integers", v)
    if len(v) > max_items:
        raise InvalidRequest(f"{what} has {len(v)} entries; at most {max_items} are accepted")
    for x in v:
        integer(x, f"every entry of {what}", lo, hi)
    return list(v)


def _numbers(v: list) -> bool:
    """Whether `v` is a list of ints and floats (not bools), or of such lists at any depth; never recursive."""
    level = [v]
    while level:
        inner = []
        for x in level:
            kinds = set(map(type, x))
            if kinds and kinds <= {list, tuple}:
                inner += x
            elif not kinds <= {int, float}:
                return False
        level = inner
    return True


def decode_tensor(v: Any, what: str) -> torch.Tensor:
    """A tensor from the wire: already decoded (msgpack extension) or a nested list of numbers (JSON)."""
    if isinstance(v, torch.Tensor):
        return v
    if isinstance(v, (list, tuple)):
        try:
            if _numbers(v):
                return torch.tensor(v, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError, OverflowError):  # ragged, or a number beyond any float
            pass
        raise InvalidTensor(f"{what} must be a tensor or a (nested) list of numbers of a regular shape")
    if is_number(v):
        raise InvalidTensor(f"{what} must be a tensor, not a single number")
    raise InvalidTensor(f"{what} must be a tensor, got {type(v).__name__}")


def pause_id(v: Any) -> Optional[int]:
    """The pause a resume names (None: whichever pause the session is at)."""
    return None if v is None else integer(v, "pause")


def decode_steps(v: Any, what: str, max_items: int) -> Any:
    if v is None or v == "all":
        return v
    if is_int(v):
        return integer(v, what, 0)
    if isinstance(v, (list, tuple)):
        return int_list(v, what, max_items, 0)
    raise _fail(what, "null, 'all', an integer or a list of integers", v)


def encode_steps(v: Any) -> Any:
    if v is None or isinstance(v, (str, int)):
        return v
    try:
        return [int(s) for s in v]
    except (TypeError, ValueError):
        raise InvalidRequest(f"steps must be a list, a range, an int or 'all', not {v!r}") from None


# ---------------------------------------------------------------- interventions and breakpoints as data

# kind -> (class, {field: (kind of value, default)})
_STEPS = ("steps", None)
_SCHEMA: dict[str, tuple[type, dict[str, tuple[str, Any]]]] = {
    "steer": (Steer, {"site": ("site", _MISSING), "vector": ("tensor", _MISSING), "scale": ("number", 1.0),
                      "positions": ("positions", None), "steps": _STEPS}),
    "scale": (Scale, {"site": ("site", _MISSING), "factor": ("number_or_tensor", _MISSING),
                      "positions": ("positions", None), "steps": _STEPS}),
    "replace": (Replace, {"site": ("site", _MISSING), "tensor": ("tensor", _MISSING),
                          "positions": ("positions", None), "steps": _STEPS}),
    "ablate": (Ablate, {"site": ("site", _MISSING), "mean": ("optional_tensor", None),
                        "positions": ("positions", None), "steps": _STEPS}),
    "capture": (Capture, {"site": ("site", _MISSING), "steps": _STEPS}),
    "logit_lens": (LogitLens, {"site": ("site", _MISSING), "top_k": ("integer", 10), "positions": ("positions", None),
                               "steps": _STEPS}),
    "breakpoint": (Breakpoint, {"site": ("site", _MISSING), "steps": ("steps", 0)}),
}
_KIND_OF = {cls: kind for kind, (cls, _) in _SCHEMA.items()}
INTERVENTION_KINDS = ("steer", "scale", "replace", "ablate", "capture", "logit_lens")


def encode_intervention(item: Any) -> dict:
    kind = _KIND_OF.get(type(item))
    if kind is None:
        raise InvalidRequest(f"not an intervention: {type(item).__name__} (use Steer, Scale, Replace, Ablate, "
                             f"Capture, LogitLens or Breakpoint)")
    out: dict[str, Any] = {"type": kind}
    for name, (vkind, _) in _SCHEMA[kind][1].items():
        value = getattr(item, name)
        if vkind == "steps":
            value = encode_steps(value)
        elif vkind == "positions" and value is not None:
            value = [int(p) for p in value]
        out[name] = value
    return out


def decode_intervention(d: Any, *, allowed: tuple[str, ...] = INTERVENTION_KINDS, max_items: int = 65536,
                        where: str = "intervention", kind_key: str = "type") -> Any:
    if not isinstance(d, dict):
        raise _fail(where, f"a map with a '{kind_key}' field", d)
    kind = d.get(kind_key)
    if kind not in allowed:
        raise InvalidRequest(f"{where} has {kind_key} {shown(kind)}; expected one of {list(allowed)}")
    cls, schema = _SCHEMA[kind]
    unknown = sorted(set(d) - set(schema) - {kind_key})
    if unknown:
        raise InvalidRequest(f"{where} ({kind}) has unknown field(s) {unknown}; fields are {sorted(schema)}")
    kwargs = {}
    for name, (vkind, default) in schema.items():
        v = d.get(name, default)
        what = f"{where} ({kind}) field '{name}'"
        if v is _MISSING:
            raise InvalidRequest(f"{where} ({kind}) needs the field '{name}'")
        if vkind == "site":
            if not isinstance(v, str):
                raise _fail(what, "a hook site name", v)
            text(v, what)
        elif vkind == "tensor":
            v = decode_tensor(v, what)
        elif vkind == "optional_tensor":
            v = None if v is None else decode_tensor(v, what)
        elif vkind == "number":
            v = number(v, what)
        elif vkind == "integer":
            v = integer(v, what)
        elif vkind == "number_or_tensor":
            v = number(v, what) if is_number(v) else decode_tensor(v, what)
        elif vkind == "positions":
            v = None if v is None else int_list(v, what, max_items)
        elif vkind == "steps":
            v = decode_steps(v, what, max_items)
        kwargs[name] = v
    return cls(**kwargs)


def decode_interventions(v: Any, what: str, max_items: int, *, breakpoints: bool = False,
                         allowed: Optional[tuple[str, ...]] = None) -> list:
    if not isinstance(v, (list, tuple)):
        raise _fail(what, "a list", v)
    if len(v) > max_items:
        raise InvalidRequest(f"{what} has {len(v)} entries; at most {max_items} are accepted")
    if allowed is None:
        allowed = ("breakpoint",) if breakpoints else INTERVENTION_KINDS
    return [decode_intervention(x, allowed=allowed, max_items=max_items, where=f"{what}[{i}]")
            for i, x in enumerate(v)]


# ---------------------------------------------------------------- generate parameters and prompts

GENERATE_PARAMS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop_tokens", "return_logits",
                   "logprobs", "top_logprobs", "interventions", "breakpoints", "activation_dtype")


def encode_prompt(prompt: Any) -> Any:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, torch.Tensor):
        return [int(x) for x in prompt.tolist()]
    try:
        return [x if isinstance(x, (int, str, float, bool)) or x is None else int(x) for x in prompt]
    except (TypeError, ValueError):
        raise InvalidRequest(f"a prompt is text or a list of token ids, got {type(prompt).__name__}") from None


def decode_prompt(v: Any, max_tokens: int, max_chars: int) -> Any:
    if isinstance(v, str):
        if len(v) > max_chars:
            raise LimitExceeded(f"prompt of {len(v)} characters exceeds the limit of {max_chars}")
        return text(v, "the prompt")
    if isinstance(v, (list, tuple)):
        if len(v) > max_tokens:
            raise LimitExceeded(f"prompt of {len(v)} tokens exceeds the limit of {max_tokens}")
        for x in v:
            if not is_int(x):
                raise InvalidRequest(f"token ids must be integers, got {shown(x)}")
            integer(x, "a token id")
        return list(v)
    raise _fail("prompt", "text or a list of token ids", v)


def encode_params(params: dict) -> dict:
    out = {}
    for k, v in params.items():
        if k == "interventions":
            v = [encode_intervention(x) for x in v]
        elif k == "breakpoints":
            v = [encode_intervention(x) for x in v]
        elif k == "stop_tokens" and v is not None:
            v = [int(x) for x in v]
        out[k] = v
    return out


def decode_params(d: Any, max_items: int = 65536) -> dict:
    """Generate parameters from the wire, type-checked and representable (finite floats, int64 integers, top_k
    an int32); the engine and the limits check their ranges."""
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise _fail("params", "a map", d)
    unknown = sorted(set(d) - set(GENERATE_PARAMS))
    if unknown:
        raise InvalidRequest(f"unknown generate parameter(s) {unknown}; parameters are {list(GENERATE_PARAMS)}")
    out: dict[str, Any] = {}
    for k, v in d.items():
        if k == "max_new_tokens":
            integer(v, k)
        elif k == "top_k":
            integer(v, k, 0, (1 << 31) - 1)
        elif k == "temperature":
            v = number(v, k, 0.0)
        elif k == "top_p":
            v = number(v, k)
        elif k == "seed":
            v = None if v is None else integer(v, k)
        elif k == "stop_tokens":
            v = None if v is None else int_list(v, k, max_items)
        elif k == "return_logits":
            if not isinstance(v, bool) and v != "all":
                raise _fail(k, "true, false or 'all'", v)
        elif k == "logprobs":
            if not isinstance(v, bool):
                raise _fail(k, "true or false", v)
        elif k == "top_logprobs":
            integer(v, k)
        elif k == "activation_dtype":
            if v is not None and not isinstance(v, str):
                raise _fail(k, "a dtype name or null", v)
        elif k == "interventions":
            v = decode_interventions(v, k, max_items)
        elif k == "breakpoints":
            v = decode_interventions(v, k, max_items, breakpoints=True)
        out[k] = v
    return out


# ---------------------------------------------------------------- events and results

def _top(t: Optional[TopTokens]) -> Optional[list]:
    return None if t is None else [t.ids, t.logprobs]


def encode_result(r: GenerateResult) -> dict:
    return {"text": r.text, "token_ids": list(r.token_ids), "finish_reason": r.finish_reason,
            "captures": [[site, step, t] for (site, step), t in r.captures.items()], "logits": r.logits,
            "logprobs": r.logprobs, "top_logprobs": _top(r.top_logprobs),
            "lens": [[site, step, *_top(t)] for (site, step), t in r.lens.items()]}


def decode_result(d: dict) -> GenerateResult:
    top = d.get("top_logprobs")
    return GenerateResult(d["text"], list(d["token_ids"]), d["finish_reason"],
                          {(site, step): t for site, step, t in d.get("captures") or []}, d.get("logits"),
                          d.get("logprobs"), None if top is None else TopTokens(*top),
                          {(site, step): TopTokens(ids, lp) for site, step, ids, lp in d.get("lens") or []})


def encode_error(e: DjinnError) -> dict:
    """Code and message; the message always encodes as UTF-8 (a lone surrogate it quotes is escaped)."""
    return {"code": e.code, "message": str(e.message).encode("utf-8", "backslashreplace").decode("utf-8")}


def encode_event(ev: Any) -> dict:
    if isinstance(ev, Token):
        return {"type": "token", "token_id": ev.token_id, "text": ev.text, "step": ev.step, "logits": ev.logits}
    if isinstance(ev, Paused):
        return {"type": "paused", "site": ev.site, "step": ev.step, "positions": list(ev.positions),
                "activation": ev.activation, "pause": ev.pause_id}
    if isinstance(ev, Done):
        return {"type": "done", "result": encode_result(ev.result)}
    if isinstance(ev, Error):
        return {"type": "error", **encode_error(ev.error)}
    raise TypeError(f"not an event: {type(ev).__name__}")


def decode_event(d: dict, paused_cls: Callable[..., Paused] = Paused) -> Any:
    kind = d.get("type")
    if kind == "token":
        return Token(d["token_id"], d["text"], d["step"], d.get("logits"))
    if kind == "paused":
        return paused_cls(d["site"], d["step"], list(d["positions"]), d["activation"], d.get("pause", -1))
    if kind == "done":
        return Done(decode_result(d["result"]))
    if kind == "error":
        return Error(error_from_code(d.get("code", "djinn_error"), d.get("message", "")))
    raise MalformedFrame(f"unexpected frame type {kind!r} from the server")


def decode_model_info(d: dict) -> ModelInfo:
    names = {f.name for f in dataclasses.fields(ModelInfo)}
    fields = {k: v for k, v in d.items() if k in names}
    fields["sites"] = tuple(SiteInfo(s["name"], tuple(s["shape"]), s["kind"]) for s in fields.get("sites", ()))
    fields["parameters"] = tuple(ParameterInfo(p["name"], tuple(p["shape"]), p["dtype"])
                                 for p in fields.get("parameters", ()))
    return ModelInfo(**fields)


def mismatch_message(client: Any, server: Any = PROTOCOL_VERSION) -> str:
    c, s = shown(client), shown(server)
    return (f"protocol version mismatch: the client speaks Djinn wire protocol {c}, the server speaks {s}; "
            f"upgrade the older side")

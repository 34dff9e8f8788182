"""The control calls, declared once.

A control call is a short request about the models, a session or a checkpoint: everything but generation and
its event stream. Each is declared here with its arguments, whose key it acts for and the shape of its reply;
every place that serves or sends one derives it from the declaration:

- the engine method of the same name (`engine/engine.py`), which takes the caller's key where `owner` says;
- the embedded client (`client/embedded.py`), which runs that method on the engine thread;
- the REST route (`server/app.py`): `verb path`, the id from the path, the other arguments as body fields;
- the control socket (`server/control.py`): `{"method": name, "args": [...]}`, the arguments in order;
- the remote clients, sync and asyncio (`client/remote.py`, `client/aio.py`): arguments encoded, the reply
  decoded.

The server decodes each argument with its `decode` (a typed error for a bad value, given the server's
`Limits`); clients encode it with its `encode`.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Any, Callable, Optional, Sequence

import torch

from . import validation
from .errors import InvalidRequest, InvalidTensor
from .sites import SiteInfo
from .wire import decode_interventions, decode_model_info, decode_tensor, encode_intervention, int_list, pause_id


class Owner(enum.Enum):
    """Whose the call's work is, and so where the engine method takes the caller's key."""

    NONE = "none"  # nothing a key holds (the models, the tokenizer): engine.<name>(*args)
    CALLER = "caller"  # the caller's own sessions: engine.<name>(owner, *args)
    OF_ID = "of_id"  # an object the caller must own, named by the first argument: engine.<name>(id, owner, *rest)


def _as_is(value: Any, limits: Any = None) -> Any:
    return value


@dataclasses.dataclass(frozen=True)
class Arg:
    name: str
    decode: Callable[[Any, Any], Any] = _as_is  # (wire value, the server's Limits) -> the engine's value
    encode: Callable[[Any], Any] = _as_is  # the client's value -> the wire's
    required: bool = False
    default: Any = None


@dataclasses.dataclass(frozen=True)
class Reply:
    """How a result travels: `wire` makes the reply body of the engine's result, `value` what the client
    returns of the body (the embedded client applies both, so both clients return the same)."""

    wire: Callable[[Any], Any]
    value: Callable[[Any], Any]


@dataclasses.dataclass(frozen=True)
class Call:
    name: str
    verb: str
    path: str  # each "{...}" in it names one of the first arguments, in order
    args: tuple[Arg, ...]
    owner: Owner
    reply: Reply
    creates: Optional[str] = None  # "session" or "checkpoint": counted against the key's limit of those
    on_engine_thread: bool = True  # False: it reads nothing that steps change (the tokenizer), so it runs beside

    @property
    def in_path(self) -> tuple[Arg, ...]:
        return self.args[:self.path.count("{")]

    @property
    def in_body(self) -> tuple[Arg, ...]:
        return self.args[len(self.in_path):]

    def engine_args(self, owner: str, args: Sequence[Any]) -> tuple:
        if self.owner is Owner.NONE:
            return tuple(args)
        if self.owner is Owner.CALLER:
            return (owner, *args)
        return (args[0], owner, *args[1:])

    def _arity(self, args: Sequence[Any]) -> None:
        least = sum(a.required for a in self.args)
        if not least <= len(args) <= len(self.args):
            names = ", ".join(a.name for a in self.args) or "none"
            raise InvalidRequest(f"{self.name} takes {least} to {len(self.args)} argument(s) ({names}), "
                                 f"got {len(args)}")

    def decode(self, args: Sequence[Any], limits: Any) -> list:
        """The engine's arguments of the wire's (missing trailing ones take their defaults)."""
        self._arity(args)
        values = list(args) + [a.default for a in self.args[len(args):]]
        return [a.decode(v, limits) for a, v in zip(self.args, values)]

    def encode(self, args: Sequence[Any]) -> list:
        self._arity(args)
        return [a.encode(v) for a, v in zip(self.args, args)]


# ---------------------------------------------------------------- arguments

def _model(value: Any, limits: Any = None) -> Optional[str]:
    if value is not None and not isinstance(value, str):
        raise InvalidRequest(f"model must be a model name, got {type(value).__name__}")
    return value


def _items(value: Any) -> list:
    try:
        return list(value)
    except TypeError:
        raise InvalidRequest(f"interventions must be a list, got {type(value).__name__}") from None


def activation(value: Any) -> Optional[torch.Tensor]:
    """A resume's replacement activation as a client sends it: a tensor, or None to resume unchanged."""
    if value is not None and not isinstance(value, torch.Tensor):
        raise InvalidTensor(f"the replacement activation must be a torch.Tensor, got {type(value).__name__}")
    return value


def _text(value: Any, limits: Any) -> str:
    if not isinstance(value, str):
        raise InvalidRequest(f"text must be a string, got {type(value).__name__}")
    if len(value) > limits.max_prompt_chars:
        raise InvalidRequest(f"text of {len(value)} characters exceeds the limit of {limits.max_prompt_chars}")
    return validation.text(value, "text")


def _optional_bool(value: Any, limits: Any = None) -> Optional[bool]:
    if value is not None and not isinstance(value, bool):
        raise InvalidRequest(f"prepend_bos must be true, false or null, got {validation.shown(value)}")
    return value


def _text_or_ids(value: Any, limits: Any) -> Any:
    return _text(value, limits) if isinstance(value, str) else int_list(value, "tokens", limits.max_prompt_tokens)


def _encode_text_or_ids(value: Any) -> Any:
    return value if isinstance(value, str) else [int(i) for i in value]


SESSION = Arg("sid", required=True)  # ids are checked by the engine, which knows them
CHECKPOINT = Arg("cid", required=True)
MODEL = Arg("model", _model, _model)
INTERVENTIONS = Arg("interventions", lambda v, lim: decode_interventions(v, "interventions", lim.max_list_items),
                    lambda v: [encode_intervention(x) for x in _items(v)], default=())
ACTIVATION = Arg("activation", lambda v, lim: None if v is None else decode_tensor(v, "the resume activation"),
                 activation)
PAUSE = Arg("pause", lambda v, lim: pause_id(v))
TEXT = Arg("text", _text, required=True)
PREPEND_BOS = Arg("prepend_bos", _optional_bool, _optional_bool)
TOKENS = Arg("tokens", _text_or_ids, _encode_text_or_ids, required=True)
WEIGHT = Arg("name", required=True)  # names are checked by the engine, which knows them
START, STOP = Arg("start"), Arg("stop")  # rows of a weight's first dimension; checked by the engine
IDS = Arg("ids", lambda v, lim: int_list(v, "ids", lim.max_prompt_tokens), lambda v: [int(i) for i in v],
          required=True)


# ---------------------------------------------------------------- replies

def plain(result: Any) -> Any:
    """Dataclasses (ModelInfo, SessionInfo), alone or in a list, as the plain dicts the wire carries."""
    if isinstance(result, list):
        return [plain(r) for r in result]
    return dataclasses.asdict(result) if dataclasses.is_dataclass(result) and not isinstance(result, type) else result


def _field(name: str) -> Reply:
    return Reply(lambda r: {name: r}, lambda body: body[name])


OK = Reply(lambda r: {"ok": True}, lambda body: None)
ID = _field("id")
PLAIN = Reply(plain, _as_is)
MODELS = Reply(plain, lambda body: [decode_model_info(m) for m in body])
SITES = Reply(plain, lambda body: [SiteInfo(s["name"], tuple(s["shape"]), s["kind"]) for s in body])


# ---------------------------------------------------------------- the calls

CALLS: dict[str, Call] = {c.name: c for c in (
    Call("models", "GET", "/api/models", (), Owner.NONE, MODELS),
    Call("sites", "GET", "/api/models/{model}/sites", (MODEL,), Owner.NONE, SITES, on_engine_thread=False),
    Call("weight", "GET", "/api/models/{model}/weights/{name}", (WEIGHT, MODEL, START, STOP), Owner.NONE,
         _field("tensor"), on_engine_thread=False),
    Call("create_session", "POST", "/api/sessions", (MODEL,), Owner.CALLER, ID, creates="session"),
    Call("list_sessions", "GET", "/api/sessions", (), Owner.CALLER, PLAIN),
    Call("session_info", "GET", "/api/sessions/{sid}", (SESSION,), Owner.OF_ID, PLAIN),
    Call("close_session", "DELETE", "/api/sessions/{sid}", (SESSION,), Owner.OF_ID, OK),
    Call("set_interventions", "PUT", "/api/sessions/{sid}/interventions", (SESSION, INTERVENTIONS), Owner.OF_ID, OK),
    Call("resume", "POST", "/api/sessions/{sid}/resume", (SESSION, ACTIVATION, PAUSE), Owner.OF_ID, OK),
    Call("cancel", "POST", "/api/sessions/{sid}/cancel", (SESSION,), Owner.OF_ID, OK),
    Call("checkpoint", "POST", "/api/sessions/{sid}/checkpoint", (SESSION,), Owner.OF_ID, ID, creates="checkpoint"),
    Call("fork", "POST", "/api/sessions/{sid}/fork", (SESSION,), Owner.OF_ID, ID, creates="session"),
    Call("checkpoint_status", "GET", "/api/checkpoints/{cid}", (CHECKPOINT,), Owner.OF_ID, PLAIN),
    Call("restore", "POST", "/api/checkpoints/{cid}/restore", (CHECKPOINT,), Owner.OF_ID, ID, creates="session"),
    Call("delete_checkpoint", "DELETE", "/api/checkpoints/{cid}", (CHECKPOINT,), Owner.OF_ID, OK),
    Call("tokenize", "POST", "/api/tokenize", (TEXT, MODEL, PREPEND_BOS), Owner.NONE, _field("ids"),
         on_engine_thread=False),
    Call("to_str_tokens", "POST", "/api/str_tokens", (TOKENS, MODEL), Owner.NONE, _field("tokens"),
         on_engine_thread=False),
    Call("detokenize", "POST", "/api/detokenize", (IDS, MODEL), Owner.NONE, _field("text"), on_engine_thread=False),
)}


def control_call(name: Any) -> Call:
    """The declared call of that name, or InvalidRequest."""
    call = CALLS.get(name) if isinstance(name, str) else None
    if call is None:
        raise InvalidRequest(f"unknown call {validation.shown(name)}; calls are {sorted(CALLS)}")
    return call

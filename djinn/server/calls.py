"""The control calls, one function each, shared by the REST routes (app.py) and the control WebSocket
(control.py): each takes the caller's identity and its arguments as they came off the wire, checks them,
runs the work on the engine thread and returns the reply body. Names and arguments are those of the
client's `Backend.call`."""
from __future__ import annotations

from typing import Any, Awaitable, Callable, Optional

from .. import validation
from ..errors import InvalidRequest
from .protocol import decode_interventions, decode_tensor, int_list, pause_id
from .state import ServerState, as_plain

OK = {"ok": True}


def _model_name(model: Any) -> Optional[str]:
    if model is not None and not isinstance(model, str):
        raise InvalidRequest(f"model must be a model name, got {type(model).__name__}")
    return model


async def models(state: ServerState, owner: str) -> list:
    return [as_plain(m) for m in await state.call("models")]


async def create_session(state: ServerState, owner: str, model: Any = None) -> dict:
    return {"id": await state.new_session(owner, "create_session", _model_name(model))}


async def list_sessions(state: ServerState, owner: str) -> list:
    return [as_plain(s) for s in await state.call("list_sessions", owner)]


async def session_info(state: ServerState, owner: str, sid: Any) -> dict:
    return as_plain(await state.call("session_info", sid, owner))


async def close_session(state: ServerState, owner: str, sid: Any) -> dict:
    await state.call("close_session", sid, owner)
    return OK


async def set_interventions(state: ServerState, owner: str, sid: Any, interventions: Any = ()) -> dict:
    items = decode_interventions(interventions, "interventions", state.limits.max_list_items)
    await state.call("set_interventions", sid, owner, items)
    return OK


async def resume(state: ServerState, owner: str, sid: Any, activation: Any = None, pause: Any = None) -> dict:
    act = None if activation is None else decode_tensor(activation, "the resume activation")
    await state.call("resume", sid, owner, act, pause_id(pause))
    return OK


async def cancel(state: ServerState, owner: str, sid: Any) -> dict:
    await state.call("cancel", sid, owner)
    return OK


async def checkpoint(state: ServerState, owner: str, sid: Any) -> dict:
    return {"id": await state.new_checkpoint(owner, sid)}


async def fork(state: ServerState, owner: str, sid: Any) -> dict:
    return {"id": await state.new_session(owner, "fork", sid)}


async def checkpoint_status(state: ServerState, owner: str, cid: Any) -> dict:
    return await state.call("checkpoint_status", cid, owner)


async def restore(state: ServerState, owner: str, cid: Any) -> dict:
    return {"id": await state.new_session(owner, "restore", cid)}


async def delete_checkpoint(state: ServerState, owner: str, cid: Any) -> dict:
    await state.call("delete_checkpoint", cid, owner)
    return OK


async def tokenize(state: ServerState, owner: str, text: Any = None, model: Any = None) -> dict:
    if not isinstance(text, str):
        raise InvalidRequest(f"text must be a string, got {type(text).__name__}")
    if len(text) > state.limits.max_prompt_chars:
        raise InvalidRequest(f"text of {len(text)} characters exceeds the limit of {state.limits.max_prompt_chars}")
    return {"ids": await state.call("tokenize", validation.text(text, "text"), _model_name(model))}


async def detokenize(state: ServerState, owner: str, ids: Any = None, model: Any = None) -> dict:
    ids = int_list(ids, "ids", state.limits.max_prompt_tokens)
    model = _model_name(model)
    await state.check_ids(ids, model)
    return {"text": await state.call("detokenize", ids, model)}


CALLS: dict[str, Callable[..., Awaitable[Any]]] = {f.__name__: f for f in (
    models, create_session, list_sessions, session_info, close_session, set_interventions, resume, cancel,
    checkpoint, fork, checkpoint_status, restore, delete_checkpoint, tokenize, detokenize)}

"""`POST /v1/chat/completions`: messages rendered with the model's own chat template (djinn/chat_template.py),
then generated on the same path as /v1/completions (openai_choice.py).

Fields: model, messages (roles system, user, assistant; content a string or a list of {"type": "text",
"text": ...} parts, joined by newlines), max_completion_tokens or max_tokens (default: the server's limit,
ending at the context), temperature, top_p, seed, stop, n, logprobs (true/false) and top_logprobs (0-20),
stream, stream_options.include_usage, user; logit_bias and the penalties only at their neutral values;
Djinn's extension fields (openai_request.py). A model without a chat template is a 400.

The rendered text holds the BOS the template writes and is tokenized without adding another, as transformers'
`apply_chat_template` does. With `djinn_session`, `messages` are the conversation's new messages: rendered
alone and appended after the session's history (without the template's BOS when the history is not empty),
the reply's tokens staying in the session for the next call.
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable, Optional

from fastapi import FastAPI, Request

from ..chat_template import ChatTemplateError
from ..models.tokenizer import Tokenizer
from ..validation import shown
from ..wire import is_int
from .openai_choice import Choice, Piece, TokenScore, head, make_choices, model_and_history, respond, tokenizer_of, usage
from .openai_request import SHARED, Ask, BadField, check_text, getter, max_tokens, parse_shared, reject_unknown
from .state import ServerState

FIELDS = ("messages", "max_tokens", "max_completion_tokens", "logprobs", "top_logprobs", *SHARED)
ROLES = ("system", "user", "assistant")
MESSAGE_FIELDS = ("role", "content", "name")
MAX_TOP_LOGPROBS = 20


# ---------------------------------------------------------------- request

def _content(i: int, v: Any) -> str:
    """A message's content as text: a string, or text parts joined by newlines."""
    where = f"messages[{i}].content"
    if isinstance(v, str):
        return v
    if not isinstance(v, list) or not v:
        raise BadField(where, "must be a string or a non-empty list of {'type': 'text', 'text': ...} parts")
    for j, part in enumerate(v):
        if not isinstance(part, dict) or part.get("type") != "text" or set(part) != {"type", "text"} \
                or not isinstance(part["text"], str):
            raise BadField(f"{where}[{j}]", f"must be {{'type': 'text', 'text': <string>}} (only text parts are "
                                            f"supported), got {shown(part)}")
    return "\n".join(part["text"] for part in v)


def _message(i: int, m: Any) -> dict:
    if not isinstance(m, dict):
        raise BadField(f"messages[{i}]", f"must be an object with 'role' and 'content', got {shown(m)}")
    unknown = sorted(set(m) - set(MESSAGE_FIELDS))
    if unknown:
        raise BadField(f"messages[{i}]", f"unknown field(s) {unknown}; a message has {list(MESSAGE_FIELDS)}")
    if m.get("role") not in ROLES:
        raise BadField(f"messages[{i}].role", f"must be one of {list(ROLES)}, got {shown(m.get('role'))}")
    if "content" not in m:
        raise BadField(f"messages[{i}].content", "is required")
    out = {"role": m["role"], "content": _content(i, m["content"])}
    if m.get("name") is not None:
        if not isinstance(m["name"], str):
            raise BadField(f"messages[{i}].name", "must be a string")
        out["name"] = m["name"]
    for v in out.values():
        check_text(f"messages[{i}]", v)
    return out


def _messages(v: Any, state: ServerState) -> list[dict]:
    lim = state.limits
    if not isinstance(v, list) or not v:
        raise BadField("messages", "must be a non-empty list of messages")
    if len(v) > lim.max_list_items:
        raise BadField("messages", f"at most {lim.max_list_items} messages")
    messages = [_message(i, m) for i, m in enumerate(v)]
    chars = sum(len(m["content"]) for m in messages)
    if chars > lim.max_prompt_chars:
        raise BadField("messages", f"{chars} characters of content exceed the limit of {lim.max_prompt_chars}")
    return messages


def _top_logprobs(body: dict) -> Optional[int]:
    get = getter(body)
    logprobs, top = get("logprobs", False), body.get("top_logprobs")
    if not isinstance(logprobs, bool):
        raise BadField("logprobs", "must be true or false")
    if top is not None:
        if not is_int(top) or not 0 <= top <= MAX_TOP_LOGPROBS:
            raise BadField("top_logprobs", f"must be an integer in [0, {MAX_TOP_LOGPROBS}], got {shown(top)}")
        if not logprobs:
            raise BadField("top_logprobs", "needs logprobs: true")
    return (top or 0) if logprobs else None


def parse(body: dict, state: ServerState) -> Ask:
    reject_unknown(body, FIELDS, "/v1/chat/completions")
    if "messages" not in body:
        raise BadField("messages", "is required")
    messages = _messages(body["messages"], state)
    lim = state.limits
    n_tokens = max_tokens(body, ("max_completion_tokens", "max_tokens"), lim.max_new_tokens, lim)
    ask = parse_shared(body, lim, n_tokens)
    ask.top_logprobs, ask.extra["messages"] = _top_logprobs(body), messages
    return ask


# ---------------------------------------------------------------- the prompt

def render(tok: Optional[Tokenizer], model: str, messages: list[dict], history: int) -> list[int]:
    """The prompt ids of `messages`: the template's text tokenized as it stands (its BOS included), without
    that BOS after a session's earlier tokens."""
    template = tok.chat_template if tok is not None else None
    if template is None:
        raise BadField("model", f"model {model} has no chat template (a 'chat_template' in its "
                                f"tokenizer_config.json or a chat_template.jinja file): use /v1/completions")
    try:
        ids = tok.encode(template.render(messages, add_generation_prompt=True))
    except ChatTemplateError as e:
        raise BadField("messages", e.message) from None
    if history and ids and ids[0] == tok.bos_id:
        ids = ids[1:]
    return ids


# ---------------------------------------------------------------- reply

def _entry(text: str, logprob: Optional[float]) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def _logprobs(scores: list[TokenScore]) -> Optional[dict]:
    if not scores:
        return None
    return {"content": [{**_entry(s.text, s.logprob), "top_logprobs": [_entry(t, lp) for t, lp in s.top or ()]}
                        for s in scores], "refusal": None}


def _extensions(c: Choice) -> dict:
    return {} if c.captures is None else {"djinn_captures": {"safetensors_b64": c.captures}}


class ChatFormat:
    """`chat.completion` replies and `chat.completion.chunk` deltas; a choice's first delta names its role."""

    stream_object = "chat.completion.chunk"

    def __init__(self) -> None:
        self.started: set[int] = set()

    def _delta(self, choice: Choice, delta: dict) -> dict:
        if choice.index not in self.started:
            self.started.add(choice.index)
            return {"role": "assistant", **delta}
        return delta

    def chunk(self, head: dict, choice: Choice, piece: Piece) -> dict:
        return {**head, "choices": [{"index": choice.index, "delta": self._delta(choice, {"content": piece.text}),
                                     "logprobs": _logprobs(piece.scores), "finish_reason": None}]}

    def last_chunk(self, head: dict, choice: Choice) -> dict:
        return {**head, "choices": [{"index": choice.index, "delta": self._delta(choice, {}), "logprobs": None,
                                     "finish_reason": choice.finish_reason, **_extensions(choice)}]}

    def reply(self, head: dict, choices: list[Choice], pieces: list[list[Piece]]) -> dict:
        return {**head, "choices": [
            {"index": c.index, "message": {"role": "assistant", "content": "".join(p.text for p in ps),
                                           "refusal": None},
             "logprobs": _logprobs([s for p in ps for s in p.scores]), "finish_reason": c.finish_reason,
             **_extensions(c)} for c, ps in zip(choices, pieces)], "usage": usage(choices)}


# ---------------------------------------------------------------- route

def register(app: FastAPI, state: ServerState, guard: Callable) -> None:
    @app.post("/v1/chat/completions")
    @guard
    async def chat_completions(request: Request):
        owner = state.auth.identify(request.headers)
        ask = parse(await state.body(request), state)
        model, history = await model_and_history(state, ask, owner)
        ids = await asyncio.to_thread(render, tokenizer_of(state, model), model, ask.extra["messages"], history)
        if len(ids) > state.limits.max_prompt_tokens:
            raise BadField("messages", f"the rendered prompt of {len(ids)} tokens exceeds the limit of "
                                       f"{state.limits.max_prompt_tokens}")
        choices = make_choices(state, owner, model, [ids], ask, history)
        return await respond(state, choices, ChatFormat(), head("chatcmpl", "chat.completion", model))

"""OpenAI-compatible routes: `POST /v1/completions`, `POST /v1/chat/completions` (openai_chat.py), both streamed
over server-sent events or not, and `GET /v1/models`.

/v1/completions fields: model, prompt (text, token ids, or a list of either), max_tokens, temperature, top_p,
seed, stop (a string or up to 4), logprobs (0-5), echo (the prompt before the completion; with logprobs, the
prompt's tokens scored too), n, stream, stream_options.include_usage, user; suffix, best_of, logit_bias and
the penalties only at their neutral values; Djinn's extension fields (openai_request.py). Any other field,
and any bad value, is a 400 with a typed error naming the field.

Stop strings are matched on the server: the text is cut before the stop string and the engine request is
cancelled at once. The model's end-of-text token ends a choice (finish_reason "stop") and adds no text.
Log-probability keys are each token's text as it reads in place, leading space kept.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from fastapi import FastAPI, Request

from ..wire import is_int
from . import openai_chat
from .openai_choice import Choice, Piece, TokenScore, head, make_choices, model_and_history, respond, usage
from .openai_request import SHARED, Ask, BadField, check_text, getter, max_tokens, parse_shared, reject_unknown
from .state import ServerState

FIELDS = ("prompt", "max_tokens", "logprobs", "echo", "suffix", "best_of", *SHARED)
MAX_PROMPTS = 64
MAX_LOGPROBS = 5


# ---------------------------------------------------------------- request

def _prompts(v: Any) -> list:
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and v:
        if all(is_int(x) for x in v):
            return [v]
        if all(isinstance(x, str) for x in v):
            return list(v)
        if all(isinstance(x, list) and x and all(is_int(t) for t in x) for x in v):
            return list(v)
    raise BadField("prompt", "must be a string, a non-empty list of token ids, or a non-empty list of strings or "
                             "of token-id lists")


def _check_prompts(prompts: list, state: ServerState) -> None:
    lim = state.limits
    if len(prompts) > MAX_PROMPTS:
        raise BadField("prompt", f"at most {MAX_PROMPTS} prompts per request")
    for p in prompts:
        if isinstance(p, str):
            if len(p) > lim.max_prompt_chars:
                raise BadField("prompt", f"a prompt of {len(p)} characters exceeds the limit of {lim.max_prompt_chars}")
            check_text("prompt", p)
        elif len(p) > lim.max_prompt_tokens:
            raise BadField("prompt", f"a prompt of {len(p)} tokens exceeds the limit of {lim.max_prompt_tokens}")


def parse(body: dict, state: ServerState) -> Ask:
    reject_unknown(body, FIELDS, "/v1/completions")
    if "prompt" not in body:
        raise BadField("prompt", "is required")
    prompts = _prompts(body["prompt"])
    _check_prompts(prompts, state)
    get = getter(body)
    ask = parse_shared(body, state.limits, max_tokens(body, ("max_tokens",), 16, state.limits), len(prompts))
    logprobs = body.get("logprobs")
    if logprobs is not None and (not is_int(logprobs) or not 0 <= logprobs <= MAX_LOGPROBS):
        raise BadField("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}], got {logprobs!r}")
    echo = get("echo", False)
    if not isinstance(echo, bool):
        raise BadField("echo", "must be true or false")
    best_of = body.get("best_of")
    if best_of is not None and best_of != ask.n:
        raise BadField("best_of", "is not supported (leave it out, or equal to n)")
    if body.get("suffix") is not None:
        raise BadField("suffix", "is not supported")
    ask.top_logprobs, ask.echo, ask.extra["prompts"] = logprobs, echo, prompts
    return ask


# ---------------------------------------------------------------- reply

def _logprobs(scores: list[TokenScore]) -> Optional[dict]:
    if not scores:
        return None
    return {"tokens": [s.text for s in scores], "token_logprobs": [s.logprob for s in scores],
            "top_logprobs": None if all(s.top is None for s in scores) else [
                None if s.top is None else dict(s.top) for s in scores],
            "text_offset": [s.offset for s in scores]}


def _extensions(c: Choice) -> dict:
    return {} if c.captures is None else {"djinn_captures": {"safetensors_b64": c.captures}}


class CompletionFormat:
    """Text completions: `text_completion` objects, choices of text (and logprobs in the legacy shape)."""

    stream_object = "text_completion"

    def chunk(self, head: dict, choice: Choice, piece: Piece) -> dict:
        return {**head, "choices": [{"text": piece.text, "index": choice.index, "logprobs": _logprobs(piece.scores),
                                     "finish_reason": None}]}

    def last_chunk(self, head: dict, choice: Choice) -> dict:
        return {**head, "choices": [{"text": "", "index": choice.index, "logprobs": None,
                                     "finish_reason": choice.finish_reason, **_extensions(choice)}]}

    def reply(self, head: dict, choices: list[Choice], pieces: list[list[Piece]]) -> dict:
        return {**head, "choices": [
            {"text": "".join(p.text for p in ps), "index": c.index,
             "logprobs": _logprobs([s for p in ps for s in p.scores]), "finish_reason": c.finish_reason,
             **_extensions(c)} for c, ps in zip(choices, pieces)], "usage": usage(choices)}


# ---------------------------------------------------------------- routes

def register(app: FastAPI, state: ServerState, guard: Callable) -> None:
    @app.get("/v1/models")
    @guard
    async def list_models(request: Request):
        state.auth.identify(request.headers)
        return {"object": "list", "data": [
            {"id": m.name, "object": "model", "created": 0, "owned_by": "djinn", "family": m.family,
             "n_layers": m.n_layers, "d_model": m.d_model, "vocab_size": m.vocab_size,
             "max_seq_len": m.max_seq_len, "dtype": m.dtype} for m in await state.call("models")]}

    @app.post("/v1/completions")
    @guard
    async def completions(request: Request):
        owner = state.auth.identify(request.headers)
        ask = parse(await state.body(request), state)
        model, history = await model_and_history(state, ask, owner)
        choices = make_choices(state, owner, model, ask.extra["prompts"], ask, history)
        return await respond(state, choices, CompletionFormat(), head("cmpl", "text_completion", model))

    openai_chat.register(app, state, guard)

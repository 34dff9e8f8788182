"""OpenAI-compatible routes: `POST /v1/completions` (streaming over server-sent events, or not) and
`GET /v1/models`.

Supported fields: model, prompt (text, token ids, or a list of either), max_tokens, temperature, top_p,
seed, stop (a string or up to 4), logprobs (0-5), n, stream, stream_options.include_usage, user; echo,
suffix, best_of, logit_bias and the penalties only at their neutral values. Any other field, and any bad
value, is a 400 with a typed error naming the field.

One Djinn extension field: `djinn_interventions`, a list of declarative interventions as JSON, e.g.
`{"type": "steer", "site": "blocks.3.hook_resid_post", "vector": [...d_model floats...], "scale": 4.0}`
(types steer, scale, replace, ablate; tensors by value as nested lists). With the official client:
`client.completions.create(..., extra_body={"djinn_interventions": [...]})`.

Every completion runs in a fresh session of the caller's key, closed when the completion ends (or when the
client goes away). Stop strings are matched on the server: the text is cut before the stop string and the
engine request is cancelled at once.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Any, AsyncIterator, Callable, Optional

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..errors import DjinnError, InvalidRequest
from ..events import Done, Error, Paused, Token
from ..validation import INT64_MAX, shown, text
from ..wire import decode_interventions, is_int, is_number
from .state import ServerState, error_body

FIELDS = ("model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "logprobs", "n", "stream",
          "stream_options", "echo", "suffix", "best_of", "logit_bias", "frequency_penalty", "presence_penalty",
          "user", "djinn_interventions")
MAX_PROMPTS = 64
MAX_N = 16
MAX_LOGPROBS = 5


class _Bad(InvalidRequest):
    """An invalid field value (400), with the field named."""

    def __init__(self, field: str, message: str):
        super().__init__(f"'{field}': {message}")
        self.param = field


# ---------------------------------------------------------------- request validation

def _text(field: str, v: str) -> None:
    """Refuses text that does not encode as UTF-8 (a lone surrogate), naming the field."""
    try:
        text(v, f"a {field} string")
    except InvalidRequest as e:
        raise _Bad(field, e.message) from None


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
    raise _Bad("prompt", "must be a string, a non-empty list of token ids, or a non-empty list of strings or "
                         "of token-id lists")


def _parse(body: dict, state: ServerState) -> dict:
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise InvalidRequest(f"unknown field(s) {unknown}; /v1/completions accepts {list(FIELDS)} "
                             f"(Djinn's interventions go in 'djinn_interventions')")
    lim = state.limits
    if "prompt" not in body:
        raise _Bad("prompt", "is required")
    prompts = _prompts(body["prompt"])
    if len(prompts) > MAX_PROMPTS:
        raise _Bad("prompt", f"at most {MAX_PROMPTS} prompts per request")
    for p in prompts:
        if isinstance(p, str):
            if len(p) > lim.max_prompt_chars:
                raise _Bad("prompt", f"a prompt of {len(p)} characters exceeds the limit of {lim.max_prompt_chars}")
            _text("prompt", p)
        if isinstance(p, list) and len(p) > lim.max_prompt_tokens:
            raise _Bad("prompt", f"a prompt of {len(p)} tokens exceeds the limit of {lim.max_prompt_tokens}")

    def get(name: str, default: Any) -> Any:
        v = body.get(name)
        return default if v is None else v

    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _Bad("model", "must be a model name")
    max_tokens = get("max_tokens", 16)
    if not is_int(max_tokens) or max_tokens < 0:
        raise _Bad("max_tokens", f"must be an integer >= 0, got {shown(max_tokens)}")
    if max_tokens > lim.max_new_tokens:
        raise _Bad("max_tokens", f"{shown(max_tokens)} exceeds this server's limit of {lim.max_new_tokens}")
    temperature = get("temperature", 1.0)  # comparing refuses NaN, Inf and ints past any float too
    if not is_number(temperature) or not 0 <= temperature <= 2:
        raise _Bad("temperature", f"must be a number in [0, 2], got {shown(temperature)}")
    top_p = get("top_p", 1.0)
    if not is_number(top_p) or not 0 < top_p <= 1:
        raise _Bad("top_p", f"must be a number in (0, 1], got {shown(top_p)}")
    seed = body.get("seed")
    if seed is not None and (not is_int(seed) or not -INT64_MAX - 1 <= seed <= INT64_MAX):
        raise _Bad("seed", f"must be a 64-bit integer, got {shown(seed)}")
    stop = get("stop", [])
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise _Bad("stop", "must be a non-empty string or a list of at most 4 non-empty strings")
    for s in stop:
        _text("stop", s)
    logprobs = body.get("logprobs")
    if logprobs is not None and (not is_int(logprobs) or not 0 <= logprobs <= MAX_LOGPROBS):
        raise _Bad("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}], got {shown(logprobs)}")
    n = get("n", 1)
    if not is_int(n) or not 1 <= n <= MAX_N:
        raise _Bad("n", f"must be an integer in [1, {MAX_N}], got {shown(n)}")
    if len(prompts) * n > MAX_PROMPTS:
        raise _Bad("n", f"prompts x n must be at most {MAX_PROMPTS}")
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        raise _Bad("best_of", "is not supported (leave it out, or equal to n)")
    stream = get("stream", False)
    if not isinstance(stream, bool):
        raise _Bad("stream", "must be true or false")
    opts = get("stream_options", {})
    if not isinstance(opts, dict) or set(opts) - {"include_usage"} or \
            not isinstance(opts.get("include_usage", False), bool):
        raise _Bad("stream_options", "accepts only {'include_usage': true|false}")
    if body.get("stream_options") is not None and not stream:
        raise _Bad("stream_options", "is only valid with stream: true")
    if get("echo", False) is not False:
        raise _Bad("echo", "is not supported")
    if body.get("suffix") is not None:
        raise _Bad("suffix", "is not supported")
    for pen in ("frequency_penalty", "presence_penalty"):
        v = get(pen, 0)
        if not is_number(v) or v != 0:
            raise _Bad(pen, "is not supported (only 0)")
    if get("logit_bias", {}) != {}:
        raise _Bad("logit_bias", "is not supported")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _Bad("user", "must be a string")
    try:
        interventions = decode_interventions(get("djinn_interventions", []), "djinn_interventions",
                                             lim.max_list_items, allowed=("steer", "scale", "replace", "ablate"))
    except DjinnError as e:
        if type(e) is InvalidRequest:
            raise _Bad("djinn_interventions", e.message) from None
        raise
    return dict(model=model, prompts=prompts, max_tokens=max_tokens, temperature=float(temperature),
                top_p=float(top_p), seed=seed, stop=stop, logprobs=logprobs, n=n, stream=stream,
                include_usage=bool(opts.get("include_usage", False)), interventions=interventions)


# ---------------------------------------------------------------- stop strings

class StopMatcher:
    """Cuts generated text before the first stop string, holding back any tail that could start one."""

    def __init__(self, stops: list[str]):
        self.stops, self.text, self.sent = stops, "", 0

    def feed(self, delta: str) -> tuple[str, bool]:
        self.text += delta
        if not self.stops:
            out, self.sent = self.text[self.sent:], len(self.text)
            return out, False
        hits = [i for i in (self.text.find(s, max(0, self.sent - len(s) + 1)) for s in self.stops) if i >= 0]
        if hits:
            cut = min(hits)
            out = self.text[self.sent:cut]
            self.sent = cut
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        safe = max(self.sent, len(self.text) - hold)
        out, self.sent = self.text[self.sent:safe], safe
        return out, False

    def flush(self) -> str:
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


# ---------------------------------------------------------------- one choice = one session

class _Choice:
    def __init__(self, state: ServerState, owner: str, model: str, index: int, prompt: Any, req: dict, seed):
        self.state, self.owner, self.model, self.index, self.prompt, self.req = state, owner, model, index, prompt, req
        self.seed = seed
        self.sid: Optional[str] = None
        self.events: asyncio.Queue = asyncio.Queue()
        self.matcher = StopMatcher(req["stop"])
        self.n_tokens = 0  # tokens the engine generated (and sent to us)
        self.offset = 0  # characters of text emitted so far
        self.finish_reason: Optional[str] = None
        self.prompt_tokens = 0
        self.terminal = False
        self.last_id: Optional[int] = None  # the token before the next new one (its alternatives follow it)

    async def start(self) -> None:
        st, req = self.state, self.req
        self.sid = await st.new_session(self.owner, "create_session", self.model)
        if req["logprobs"]:  # the token before each new one, which its alternatives' text follows
            ids = self.prompt if isinstance(self.prompt, list) else await asyncio.to_thread(
                st.service.engine.tokenize, self.prompt, self.model)
            self.last_id = ids[-1] if ids else None
        await st.generate(self.sid, self.owner, self.prompt, st.sink(self.events.put_nowait),
                          max_new_tokens=req["max_tokens"], temperature=req["temperature"], top_p=req["top_p"],
                          seed=self.seed, return_logits=req["logprobs"] is not None,
                          interventions=req["interventions"])

    async def pieces(self) -> AsyncIterator[tuple[str, Optional[dict]]]:
        """(text, logprobs part) as tokens arrive; sets finish_reason at the end."""
        while True:
            ev = await self.events.get()
            if isinstance(ev, Token):
                self.n_tokens += 1
                text, stopped = self.matcher.feed(ev.text)
                lp = await self._logprobs(ev, text) if self.req["logprobs"] is not None else None
                if text or lp:
                    yield text, lp
                    self.offset += len(text)
                if stopped:
                    self.finish_reason = "stop"
                    await self._finish()
                    return
            elif isinstance(ev, Done):
                self.terminal = True
                tail = self.matcher.flush()
                if tail:
                    yield tail, None
                self.finish_reason = "stop" if ev.result.finish_reason == "stop" else "length"
                await self._finish()
                return
            elif isinstance(ev, Error):
                self.terminal = True
                raise ev.error
            elif isinstance(ev, Paused):  # no breakpoints here; never leave a session stuck
                self.state.post_nowait("resume", self.sid, self.owner, None)

    async def _finish(self) -> None:
        """Stop the engine request (if still running), count the prompt tokens, close the session."""
        st = self.state
        if not self.terminal:
            await st.call("cancel", self.sid, self.owner)
            while not self.terminal:  # events sent before the cancel are all queued by now
                ev = await self.events.get()
                if isinstance(ev, Token):
                    self.n_tokens += 1
                self.terminal = isinstance(ev, (Done, Error))
        info = await st.call("session_info", self.sid, self.owner)
        self.prompt_tokens = info.n_tokens - self.n_tokens
        await self.close()

    async def close(self) -> None:
        if self.sid is not None:
            sid, self.sid = self.sid, None
            try:
                await self.state.call("close_session", sid, self.owner)
            except DjinnError:
                pass

    def close_nowait(self) -> None:
        if self.sid is not None:
            sid, self.sid = self.sid, None
            self.state.post_nowait("close_session", sid, self.owner)

    async def _token_text(self, before: Optional[int], tid: int) -> str:
        """The text token `tid` would add after token `before` (spaces kept, as the completion's text has them)."""
        engine = self.state.service.engine
        try:
            if before is None:
                return await asyncio.to_thread(engine.detokenize, [tid], self.model)
            return (await asyncio.to_thread(engine.to_str_tokens, [before, tid], self.model))[1]
        except DjinnError:  # a model without a tokenizer
            return f"<{tid}>"

    async def _logprobs(self, ev: Token, text: str) -> dict:
        lp = torch.log_softmax(ev.logits.float(), dim=-1)
        k = self.req["logprobs"]
        top = None
        if k > 0:
            vals, ids = lp.topk(k)
            top = {}
            for v, i in zip(vals.tolist(), ids.tolist()):
                top[await self._token_text(self.last_id, i)] = v
        self.last_id = ev.token_id
        return {"tokens": [ev.text], "token_logprobs": [float(lp[ev.token_id])],
                "top_logprobs": [top] if top is not None else None, "text_offset": [self.offset]}


def _merge_logprobs(parts: list[dict]) -> Optional[dict]:
    if not parts:
        return None
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for p in parts:
        out["tokens"] += p["tokens"]
        out["token_logprobs"] += p["token_logprobs"]
        out["text_offset"] += p["text_offset"]
        out["top_logprobs"] += p["top_logprobs"] if p["top_logprobs"] is not None else [None]
    if all(t is None for t in out["top_logprobs"]):
        out["top_logprobs"] = None
    return out


def _usage(choices: list[_Choice]) -> dict:
    prompt = sum(c.prompt_tokens for c in choices)
    completion = sum(c.n_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


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
        try:
            req = _parse(await state.body(request), state)
        except _Bad as e:
            state.metrics.error(e.code)
            body = error_body(e)
            body["error"]["param"] = e.param
            return JSONResponse(body, status_code=e.http_status)
        model = (await state.model_info(req["model"])).name
        choices: list[_Choice] = []
        base_seed = req["seed"] if req["seed"] is not None else secrets.randbits(62)
        for i, p in enumerate(req["prompts"]):
            for j in range(req["n"]):
                choices.append(_Choice(state, owner, model, len(choices), p, req, base_seed + j))
        try:
            for c in choices:  # validation errors (unknown site, bad tensor, ...) surface here as 4xx
                await c.start()
        except BaseException:
            for c in choices:
                c.close_nowait()
            raise
        cid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        head = {"id": cid, "object": "text_completion", "created": created, "model": model,
                "system_fingerprint": None}
        if req["stream"]:
            return StreamingResponse(_sse(state, choices, head, req), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:  # every choice runs to its end; the first failure, if any, is the answer
            results = await asyncio.gather(*[_collect(c) for c in choices], return_exceptions=True)
        finally:  # (normally each choice has closed its session already; not when one failed or we were cancelled)
            for c in choices:
                c.close_nowait()
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        if failed is not None:
            raise failed
        return {**head, "choices": [
            {"text": text, "index": c.index, "logprobs": lp, "finish_reason": c.finish_reason}
            for c, (text, lp) in zip(choices, results)], "usage": _usage(choices)}


async def _collect(c: _Choice) -> tuple[str, Optional[dict]]:
    texts, lps = [], []
    async for text, lp in c.pieces():
        texts.append(text)
        if lp is not None:
            lps.append(lp)
    return "".join(texts), _merge_logprobs(lps)


async def _sse(state: ServerState, choices: list[_Choice], head: dict, req: dict) -> AsyncIterator[str]:
    out: asyncio.Queue = asyncio.Queue()

    async def pump(c: _Choice) -> None:
        try:
            async for text, lp in c.pieces():
                out.put_nowait({**head, "choices": [{"text": text, "index": c.index, "logprobs": lp,
                                                     "finish_reason": None}]})
            out.put_nowait({**head, "choices": [{"text": "", "index": c.index, "logprobs": None,
                                                 "finish_reason": c.finish_reason}]})
        except DjinnError as e:
            state.metrics.error(e.code)
            out.put_nowait(error_body(e))
        except Exception as e:  # never a traceback to the client
            out.put_nowait(error_body(InvalidRequest(f"stream failed ({type(e).__name__})")))
        finally:
            out.put_nowait(None)

    tasks = [asyncio.ensure_future(pump(c)) for c in choices]
    try:
        remaining = len(tasks)
        failed = False
        while remaining:
            item = await out.get()
            if item is None:
                remaining -= 1
                continue
            if "error" in item:
                failed = True
            yield f"data: {json.dumps(item)}\n\n"
            if failed:
                break
        if not failed and req["include_usage"]:
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': _usage(choices)})}\n\n"
        yield "data: [DONE]\n\n"
    finally:  # also when the client goes away mid-stream: cancel the pumps, free the sessions
        for t in tasks:
            t.cancel()
        for c in choices:
            c.close_nowait()

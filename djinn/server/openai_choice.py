"""One general path under both OpenAI routes: each choice is one engine call in a session, its tokens turned
into text pieces (stop strings cut on the server), log-probabilities and captures; the route's `Format` only
shapes them into its JSON (text completions or chat), streamed over server-sent events or whole.

A choice runs in a fresh session of the caller's key, closed when it ends (or when the client goes away), or
in the caller's own session (`djinn_session`), which stays open with the call's tokens in its history.
"""
from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional, Protocol, Sequence, Union

import torch

from ..errors import DjinnError, Forbidden, InternalError, InvalidRequest, UnknownSession
from ..events import Done, Error, GenerateResult, Paused, Token
from ..interventions import LogitLens
from ..models.tokenizer import IncrementalDecoder, Tokenizer
from ..validation import shown
from .openai_request import Ask, BadField
from .state import ServerState, error_body


@dataclass
class TokenScore:
    """One token of a choice's text with its log-probability and the best alternatives at its position."""

    text: str
    logprob: Optional[float]  # None where nothing came before it (a session's first token)
    top: Optional[list[tuple[str, float]]]  # best first; None unless alternatives were asked for
    offset: int  # where its text starts in the choice's text


@dataclass
class Piece:
    text: str
    scores: list[TokenScore]


class Format(Protocol):
    """How a route writes its choices: `head` is the id, object, created and model of every reply (chunks
    carry `stream_object` as their object)."""

    stream_object: str

    def chunk(self, head: dict, choice: "Choice", piece: Piece) -> dict: ...

    def last_chunk(self, head: dict, choice: "Choice") -> dict: ...

    def reply(self, head: dict, choices: list["Choice"], pieces: list[list[Piece]]) -> dict: ...


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


def tokenizer_of(state: ServerState, model: str) -> Optional[Tokenizer]:
    """The model's tokenizer: set at startup and only read, so the event loop's worker threads may use it."""
    return state.service.engine.workers[model].tokenizer


async def model_and_history(state: ServerState, ask: Ask, owner: str) -> tuple[str, int]:
    """The model a request runs on, and the tokens its session holds already (0 for fresh sessions). A caller's
    session names its model; another key's session is refused as an unknown one is: its id says nothing to
    anyone else, not even that it exists."""
    if ask.session is None:
        return (await state.model_info(ask.model)).name, 0
    try:
        info = await state.call("session_info", ask.session, owner)
    except Forbidden:
        raise UnknownSession(f"no session {shown(ask.session)} (closed, expired, or never created)") from None
    if ask.model is not None and ask.model != info.model:
        raise BadField("model", f"session {shown(ask.session)} runs model {info.model}, not {shown(ask.model)}")
    return info.model, info.n_tokens


def _alternatives(tok: Optional[Tokenizer], before: Optional[int], ids: Sequence[int]) -> list[str]:
    """The text each of `ids` would add after token `before` (spaces kept, as the choice's text has them)."""
    if tok is None:
        return [f"<{i}>" for i in ids]
    context = [] if before is None else [before]
    return [tok.decode_after(context, [i]) for i in ids]


class Choice:
    """One choice: one engine call. `prompt` is text or token ids; `history` the tokens its session holds
    before the call (a caller's session), 0 for a fresh one."""

    def __init__(self, state: ServerState, owner: str, model: str, index: int, prompt: Union[str, list[int]],
                 ask: Ask, seed: int, history: int = 0):
        self.state, self.owner, self.model, self.index, self.ask, self.seed = state, owner, model, index, ask, seed
        self.prompt, self.history = prompt, history
        self.tokenizer = tokenizer_of(state, model)
        self.sid: Optional[str] = ask.session
        self.owns_session = ask.session is None
        self.events: asyncio.Queue = asyncio.Queue()
        self.matcher = StopMatcher(ask.stop)
        self.prompt_ids: list[int] = []
        self.n_tokens = 0  # tokens the engine generated (and sent to us)
        self.text_len = 0  # characters of token text scored so far: the next token's offset
        self.finish_reason: Optional[str] = None
        self.terminal = False
        self.last_id: Optional[int] = None  # the token before the next new one (its alternatives follow it)
        self.captures: Optional[str] = None  # base64 safetensors, when captures were asked for
        self.echo_text = ""  # the prompt as the caller wrote it, when echoed
        self.echo: Optional[Piece] = None  # the echoed prompt with its tokens' scores

    # ---------------------------------------------------------------- the engine call

    async def start(self) -> None:
        st, ask = self.state, self.ask
        self.prompt_ids = await self._ids()
        if self.owns_session:
            self.sid = await st.new_session(self.owner, "create_session", self.model)
        self.last_id = self.prompt_ids[-1] if self.prompt_ids else None
        if ask.echo:  # the completion's offsets count from the start of the echoed prompt
            self.echo_text = self.prompt if isinstance(self.prompt, str) else await asyncio.to_thread(
                st.service.engine.detokenize, self.prompt_ids, self.model)
            self.text_len = len(self.echo_text)
        await st.generate(self.sid, self.owner, self.prompt_ids, st.sink(self.events.put_nowait),
                          max_new_tokens=ask.max_tokens, temperature=ask.temperature, top_p=ask.top_p,
                          seed=self.seed, return_logits=ask.top_logprobs is not None,
                          interventions=[*ask.edits, *self._echo_lens()],
                          logprobs=ask.echo and ask.top_logprobs is not None)

    async def _ids(self) -> list[int]:
        """The ids the prompt is fed as: a text prompt is tokenized here, with the BOS the model's rule gives
        the first prompt of a session, so that echo and usage know exactly what the engine saw."""
        if isinstance(self.prompt, list):
            return self.prompt
        bos = None if self.history == 0 else False
        return await asyncio.to_thread(self.state.service.engine.tokenize, self.prompt, self.model, bos)

    @property
    def added_bos(self) -> int:
        """1 where the server put a BOS before a text prompt (echo leaves it out: the caller never wrote it)."""
        tok = self.tokenizer
        return int(isinstance(self.prompt, str) and bool(self.prompt_ids) and tok is not None
                   and self.prompt_ids[0] == tok.bos_id and self.history == 0 and tok.add_bos)

    def _echo_lens(self) -> list:
        """The alternatives at each prompt position: the logit lens at the last block's output is the model's
        own next-token distribution, reduced to the top k on the device (never [T, vocab] logits)."""
        k = self.ask.top_logprobs
        if not (self.ask.echo and k):
            return []
        last = self.state.service.engine.workers[self.model].cfg.n_layers - 1
        return [LogitLens(f"blocks.{last}.hook_resid_post", top_k=k, steps=[0])]

    # ---------------------------------------------------------------- its output

    async def pieces(self) -> AsyncIterator[Piece]:
        """Text pieces (and their tokens' scores) as tokens arrive, the echoed prompt first; sets
        finish_reason at the end."""
        if self.ask.echo and self.ask.top_logprobs is not None:
            held = [p async for p in self._generated()]  # the prompt's scores come with the call's result
            yield self.echo
            for p in held:
                yield p
            return
        if self.ask.echo:
            yield Piece(self.echo_text, [])
        async for p in self._generated():
            yield p

    @property
    def needs_result(self) -> bool:
        """Whether the call's final result is part of the answer (captures, the echoed prompt's scores): then a
        stop string cuts the text but the call runs to its end, since a cancelled call has no result."""
        return bool(self.ask.captures) or (self.ask.echo and self.ask.top_logprobs is not None)

    async def _generated(self) -> AsyncIterator[Piece]:
        stopped = False
        while True:
            ev = await self.events.get()
            if isinstance(ev, Token):
                self.n_tokens += 1
                if stopped:
                    continue
                ends = self.tokenizer is not None and ev.token_id in self.tokenizer.end_ids  # no text, no score
                text, stopped = self.matcher.feed("" if ends else ev.text)
                scores = [await self._score(ev, ev.text)] if self.ask.top_logprobs is not None and not ends else []
                if text or scores:
                    yield Piece(text, scores)
                if stopped:
                    self.finish_reason = "stop"
                    if not self.needs_result:
                        await self._finish()
                        return
            elif isinstance(ev, Done):
                self.terminal = True
                tail = "" if stopped else self.matcher.flush()
                if tail:
                    yield Piece(tail, [])
                if not stopped:
                    self.finish_reason = "stop" if ev.result.finish_reason == "stop" else "length"
                await self._done(ev.result)
                await self._finish()
                return
            elif isinstance(ev, Error):
                self.terminal = True
                raise ev.error
            elif isinstance(ev, Paused):  # no breakpoints here; never leave a session stuck
                self.state.post_nowait("resume", self.sid, self.owner, None)

    async def _score(self, ev: Token, text: str) -> TokenScore:
        lp = torch.log_softmax(ev.logits.float(), dim=-1)
        top = None
        k = self.ask.top_logprobs
        if k:
            vals, ids = lp.topk(k)
            texts = await asyncio.to_thread(_alternatives, self.tokenizer, self.last_id, ids.tolist())
            top = list(zip(texts, vals.tolist()))
        self.last_id = ev.token_id
        score = TokenScore(text, float(lp[ev.token_id]), top, self.text_len)
        self.text_len += len(text)
        return score

    async def _done(self, result: GenerateResult) -> None:
        """What only the whole call's result holds: the captures, and the echoed prompt's scores."""
        if self.ask.captures:
            self.captures = await asyncio.to_thread(encode_captures, result.captures,
                                                    self.state.limits.max_frame_bytes)
        if self.ask.echo and self.ask.top_logprobs is not None:
            self.echo = await asyncio.to_thread(self._echo_piece, result)

    def _echo_piece(self, result: GenerateResult) -> Piece:
        ids = self.prompt_ids[self.added_bos:]
        decoder = IncrementalDecoder(self.tokenizer, self.prompt_ids[:self.added_bos])
        lps = result.logprobs.tolist()[self.added_bos:len(self.prompt_ids)]
        lens = next(iter(result.lens.values()), None)
        # the prefill's lens rows end with the prompt's; a continued session's prefill may start one token
        # earlier (its last token, sampled but not yet fed), whose row predicts the prompt's first token
        first_row = 0 if lens is None else len(lens.ids) - len(self.prompt_ids)
        scores, offset = [], 0
        for j, (tid, lp) in enumerate(zip(ids, lps)):
            at = j + self.added_bos  # its position among the prompt's ids
            row = first_row + at - 1  # the row before it predicted it
            top = None
            if lens is not None and row >= 0:
                before = self.prompt_ids[at - 1] if at > 0 else None
                top = list(zip(_alternatives(self.tokenizer, before, lens.ids[row].tolist()),
                               lens.logprobs[row].tolist()))
            piece = decoder.push(tid)
            scores.append(TokenScore(piece, None if lp != lp else lp, top, offset))  # NaN: nothing before it
            offset += len(piece)
        return Piece(self.echo_text, scores)

    async def _finish(self) -> None:
        """Stop the engine request (if still running); close the session if it is the call's own."""
        st = self.state
        if not self.terminal:
            await st.call("cancel", self.sid, self.owner)
            while not self.terminal:  # events sent before the cancel are all queued by now
                ev = await self.events.get()
                if isinstance(ev, Token):
                    self.n_tokens += 1
                self.terminal = isinstance(ev, (Done, Error))
        await self.close()

    async def close(self) -> None:
        if self.sid is not None and self.owns_session:
            sid, self.sid = self.sid, None
            try:
                await self.state.call("close_session", sid, self.owner)
            except DjinnError:
                pass

    def abandon(self) -> None:
        """The client went away or a sibling failed: free the call's own session, stop a caller's session."""
        if self.sid is None:
            return
        if self.owns_session:
            sid, self.sid = self.sid, None
            self.state.post_nowait("close_session", sid, self.owner)
        elif not self.terminal:
            self.terminal = True
            self.state.post_nowait("cancel", self.sid, self.owner)

    @property
    def usage(self) -> tuple[int, int]:
        return len(self.prompt_ids), self.n_tokens


def encode_captures(captures: dict[tuple[str, int], torch.Tensor], limit: int) -> str:
    """Captures as one safetensors file, base64: the tensor of site s at step k is named "s@k"."""
    from safetensors.torch import save

    data = save({f"{site}@{step}": t.contiguous() for (site, step), t in captures.items()})
    size = (len(data) + 2) // 3 * 4
    if size > limit:
        raise InvalidRequest(f"the captures come to {size} bytes (base64), over this server's frame limit of "
                             f"{limit} bytes: capture fewer sites or tokens")
    return base64.b64encode(data).decode("ascii")


def usage(choices: list[Choice]) -> dict:
    prompt = sum(c.usage[0] for c in choices)
    completion = sum(c.usage[1] for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# ---------------------------------------------------------------- running the choices of a request

def head(prefix: str, obj: str, model: str) -> dict:
    """What every reply and chunk of one request starts with."""
    return {"id": f"{prefix}-{secrets.token_hex(12)}", "object": obj, "created": int(time.time()), "model": model,
            "system_fingerprint": None}


def make_choices(state: ServerState, owner: str, model: str, prompts: list, ask: Ask, history: int = 0) -> list[Choice]:
    base_seed = ask.seed if ask.seed is not None else secrets.randbits(62)
    choices: list[Choice] = []
    for p in prompts:
        for j in range(ask.n):
            choices.append(Choice(state, owner, model, len(choices), p, ask, base_seed + j, history))
    return choices


async def respond(state: ServerState, choices: list[Choice], fmt: Format, head: dict) -> Any:
    """Start every choice (a bad input fails here, before anything is sent), then answer whole or streamed."""
    from fastapi.responses import StreamingResponse

    try:
        for c in choices:  # validation errors (unknown site, bad tensor, ...) surface here as 4xx
            await c.start()
    except BaseException:
        for c in choices:
            c.abandon()
        raise
    if choices[0].ask.stream:
        return StreamingResponse(_sse(state, choices, fmt, {**head, "object": fmt.stream_object}), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    try:  # every choice runs to its end; the first failure, if any, is the answer
        results = await asyncio.gather(*[_collect(c) for c in choices], return_exceptions=True)
    finally:  # (normally each choice has closed its session already; not when one failed or we were cancelled)
        for c in choices:
            c.abandon()
    failed = next((r for r in results if isinstance(r, BaseException)), None)
    if failed is not None:
        raise failed
    return fmt.reply(head, choices, results)


async def _collect(c: Choice) -> list[Piece]:
    return [p async for p in c.pieces()]


async def _sse(state: ServerState, choices: list[Choice], fmt: Format, head: dict) -> AsyncIterator[str]:
    out: asyncio.Queue = asyncio.Queue()

    async def pump(c: Choice) -> None:
        try:
            async for piece in c.pieces():
                out.put_nowait(fmt.chunk(head, c, piece))
            out.put_nowait(fmt.last_chunk(head, c))
        except DjinnError as e:
            state.metrics.error(e.code)
            out.put_nowait(error_body(e))
        except Exception as e:  # never a traceback to the client
            out.put_nowait(error_body(InternalError(f"stream failed ({type(e).__name__})")))
        finally:
            out.put_nowait(None)

    tasks = [asyncio.ensure_future(pump(c)) for c in choices]
    try:
        remaining, failed = len(tasks), False
        while remaining:
            item = await out.get()
            if item is None:
                remaining -= 1
                continue
            failed = "error" in item
            yield f"data: {json.dumps(item)}\n\n"
            if failed:
                break
        if not failed and choices[0].ask.include_usage:
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage(choices)})}\n\n"
        yield "data: [DONE]\n\n"
    finally:  # also when the client goes away mid-stream: cancel the pumps, free the sessions
        for t in tasks:
            t.cancel()
        for c in choices:
            c.abandon()

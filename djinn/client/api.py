"""The user-facing client: `Client`, `Session`, `Checkpoint`. The same classes serve the embedded engine and
a remote server; only the backend underneath differs."""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, NamedTuple, Optional, Protocol, Sequence, Union

import torch

from ..errors import DjinnError
from ..events import Done, Error, GenerateResult, ModelInfo, Paused, RunDone, RunResult
from ..interventions import Breakpoint
from ..sites import SiteInfo

Prompt = Union[str, Sequence[int]]
WEIGHT_PART_BYTES = 8 << 20  # a weight travels in parts of at most this, well under any frame limit
RUN_WINDOW = 256  # prompts of a run fed and not yet answered, by default


@dataclass(frozen=True)
class Item:
    """A prompt of `Client.run` / `run_iter` with interventions of its own (applied after the run's)."""

    prompt: Prompt
    interventions: Sequence = ()


class RunChannel(Protocol):
    """A backend's run in progress: prompts go in, RunResult events come out, then RunDone (or Error)."""

    def feed(self, items: list[tuple[int, Item]], last: bool) -> None: ...

    def events(self) -> Iterator[object]: ...

    def cancel(self) -> None: ...


class Backend(Protocol):
    def call(self, method: str, *args: Any, **kwargs: Any) -> Any: ...

    def stream(self, sid: str, prompt: Prompt, params: dict) -> Iterator[object]: ...

    def generate(self, sid: str, prompt: Prompt, params: dict) -> GenerateResult:
        """To completion without breakpoints, as one reply (no event a token)."""
        ...

    def attach(self, sid: str) -> Iterator[object]: ...

    def open_run(self, model: Optional[str], window: int, params: dict) -> RunChannel: ...

    def close(self) -> None: ...


def weight_parts(models: list[ModelInfo], name: str, model: Optional[str]) -> Optional[list[tuple[int, int]]]:
    """The row ranges of its first dimension a weight is read in, or None where no model lists it."""
    m = next((m for m in models if m.name == model), None) if model else models[0]
    info = next((p for p in m.parameters if p.name == name), None) if m else None
    if info is None:
        return None
    rows = max(1, WEIGHT_PART_BYTES // (math.prod(info.shape[1:]) * getattr(torch, info.dtype).itemsize))
    return [(lo, min(lo + rows, info.shape[0])) for lo in range(0, info.shape[0], rows)]


class Checkpoint:
    """A snapshot of a session, copied to host memory in the background."""

    def __init__(self, backend: Backend, cid: str):
        self._backend, self.id = backend, cid

    def status(self) -> dict:
        return self._backend.call("checkpoint_status", self.id)

    @property
    def done(self) -> bool:
        return bool(self.status()["done"])

    def wait(self, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            if st["done"] or time.monotonic() > deadline:
                return st
            time.sleep(0.001)

    def restore(self) -> "Session":
        return Session(self._backend, self._backend.call("restore", self.id))

    def delete(self) -> None:
        self._backend.call("delete_checkpoint", self.id)


class Session:
    """A server-resident session: its token history and KV cache live with the engine."""

    def __init__(self, backend: Backend, sid: str):
        self._backend, self.id = backend, sid

    def __repr__(self) -> str:
        return f"Session({self.id!r})"

    def stream(self, prompt: Prompt = (), *, max_new_tokens: int = 16, breakpoints: Sequence[Breakpoint] = (),
               **params: Any) -> Iterator[object]:
        """Yield Token and Paused events (then stop after Done). A Paused event waits for `ev.resume()`.

        Leaving the loop early cancels the request; tokens already produced stay in the session."""
        params = dict(params, max_new_tokens=max_new_tokens, breakpoints=list(breakpoints))
        yield from self._until_done(self._backend.stream(self.id, prompt, params))

    def attach(self) -> Iterator[object]:
        """The events of the call in progress, from now on: after reconnecting to a paused session, or for a
        fork made at a pause (`fork()` while paused). A paused session first repeats its Paused event."""
        yield from self._until_done(self._backend.attach(self.id))

    @staticmethod
    def _until_done(events: Iterator[object]) -> Iterator[object]:
        for ev in events:
            if isinstance(ev, Error):
                raise ev.error
            yield ev
            if isinstance(ev, Done):
                return

    def generate(self, prompt: Prompt = (), *, max_new_tokens: int = 16, **params: Any) -> GenerateResult:
        """Run to completion: greedy unless temperature > 0; returns text, token ids, captures, logits.
        Without breakpoints the result comes back in one reply (over a remote server, one REST request, which
        the client's `timeout` bounds); with them, pauses are resumed unchanged."""
        if not params.get("breakpoints"):
            return self._backend.generate(self.id, prompt, dict(params, max_new_tokens=max_new_tokens))
        for ev in self.stream(prompt, max_new_tokens=max_new_tokens, **params):
            if isinstance(ev, Done):
                return ev.result
            if isinstance(ev, Paused):  # breakpoints belong to stream(); generate() continues unchanged
                ev.resume()
        raise DjinnError("generation ended without a result")

    def set_interventions(self, interventions: Sequence) -> None:
        """Interventions applied to every later call of this session (replacing earlier ones)."""
        self._backend.call("set_interventions", self.id, list(interventions))

    def info(self) -> dict:
        return self._backend.call("session_info", self.id)

    def checkpoint(self) -> Checkpoint:
        return Checkpoint(self._backend, self._backend.call("checkpoint", self.id))

    def fork(self) -> "Session":
        """A new session with this one's history, sharing its KV cache copy-on-write. While this session is
        paused at a breakpoint, the fork is paused at the same point: `attach()` to it and resume it with
        its own edit."""
        return Session(self._backend, self._backend.call("fork", self.id))

    def close(self) -> None:
        self._backend.call("close_session", self.id)

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Client:
    def __init__(self, backend: Backend):
        self._backend = backend
        self._models: Optional[list[ModelInfo]] = None  # the server's models, once a weight is read

    def models(self) -> list[ModelInfo]:
        return self._backend.call("models")

    def session(self, model: Optional[str] = None) -> Session:
        return Session(self._backend, self._backend.call("create_session", model))

    def sessions(self) -> list[dict]:
        return self._backend.call("list_sessions")

    def sites(self, model: Optional[str] = None) -> list[SiteInfo]:
        """Every public hook site of the model, in forward order, with its shape."""
        return self._backend.call("sites", model)

    def weight(self, name: str, model: Optional[str] = None) -> torch.Tensor:
        """A copy of a weight by its TransformerLens name (`ModelInfo.parameters` lists them), e.g. "W_U" or
        "blocks.3.attn.W_Q"; a large one arrives in parts of at most WEIGHT_PART_BYTES."""
        if self._models is None:
            self._models = self.models()
        parts = weight_parts(self._models, name, model)
        if parts is None:  # the server says why (an unknown weight or model)
            return self._backend.call("weight", name, model)
        return torch.cat([self._backend.call("weight", name, model, lo, hi) for lo, hi in parts])

    def tokenize(self, text: str, model: Optional[str] = None, prepend_bos: Optional[bool] = None) -> list[int]:
        """Exactly the ids `text` is fed as when it opens a session: BOS first where the model's tokenizer
        adds one. A later prompt of a session gets no BOS: `prepend_bos=False` gives its ids."""
        return self._backend.call("tokenize", text, model, prepend_bos)

    def to_str_tokens(self, tokens: Prompt, model: Optional[str] = None) -> list[str]:
        """Each token's text as it reads in place (spaces kept), of text (tokenized as `tokenize` does) or ids."""
        return self._backend.call("to_str_tokens", tokens if isinstance(tokens, str) else list(tokens), model)

    def detokenize(self, ids: Sequence[int], model: Optional[str] = None) -> str:
        return self._backend.call("detokenize", list(ids), model)

    def session_by_id(self, sid: str) -> Session:
        """One of this key's sessions by id (from `sessions()`), e.g. to close it."""
        self._backend.call("session_info", sid)  # its owner's, or a typed error
        return Session(self._backend, sid)

    def run(self, prompts: Iterable[Union[Prompt, Item]], *, model: Optional[str] = None, max_new_tokens: int = 0,
            interventions: Sequence = (), window: int = RUN_WINDOW, progress: bool = False,
            **params: Any) -> RunResults:
        """Many prompts in one call, batched by the engine: a result per prompt (as `Session.generate` gives),
        in the prompts' order. `interventions`: shared by every prompt, or one list per prompt; `params` as
        generate's (captures, LogitLens, return_logits, ...). Each prompt runs in a session of its own that
        closes with its result: none outlives the call, whatever happens. `max_new_tokens=0` is a forward
        only, which ends after the last captured site when nothing else is asked for."""
        results = list(self.run_iter(prompts, model=model, max_new_tokens=max_new_tokens,
                                     interventions=interventions, window=window, progress=progress, **params))
        return RunResults(results, {s.name: s for s in self.sites(model)})

    def run_iter(self, prompts: Iterable[Union[Prompt, Item]], *, model: Optional[str] = None,
                 max_new_tokens: int = 0, interventions: Sequence = (), window: int = RUN_WINDOW,
                 progress: bool = False, **params: Any) -> Iterator[GenerateResult]:
        """As `run`, for an iterable of any length (a dataset): results come in the prompts' order while
        later prompts run, with at most `window` prompts fed and unanswered (memory stays bounded on both
        sides; a caller that reads slowly slows only its own feed). `progress=True` shows a tqdm bar.
        Leaving the loop early cancels the rest."""
        items, shared = _run_items(prompts, interventions)
        channel = self._backend.open_run(model, window, dict(params, max_new_tokens=max_new_tokens,
                                                             interventions=shared))
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(prompts) if hasattr(prompts, "__len__") else None, unit="prompt")
        try:
            yield from _ordered_run(channel, items, window, bar)
        finally:
            channel.cancel()  # ended early or failed: the rest of the run goes (a finished run: nothing to do)
            if bar is not None:
                bar.close()

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()



class Stacked(NamedTuple):
    values: torch.Tensor  # [n_prompts, ...] each prompt's value zero-padded to the largest in every dimension
    lengths: torch.Tensor  # [n_prompts]: each prompt's number of tokens at the site (its "tokens" dimension)


class RunResults(list):
    """`Client.run`'s results, one GenerateResult per prompt, in the prompts' order."""

    def __init__(self, results: Iterable[GenerateResult], sites: dict[str, SiteInfo]):
        super().__init__(results)
        self._sites = sites

    def stack(self, site: str, step: int = 0) -> Stacked:
        """Every prompt's capture of `site` at `step` in one zero-padded tensor, with each one's token count."""
        values = [r.captures[(site, step)] for r in self]
        if not values:
            raise DjinnError("no results to stack")
        info = self._sites.get(site)
        axis = info.shape.index("tokens") if info is not None and "tokens" in info.shape else 0
        size = [max(v.shape[d] for v in values) for d in range(values[0].dim())]
        out = values[0].new_zeros((len(values), *size))
        for i, v in enumerate(values):
            out[(i, *(slice(0, n) for n in v.shape))] = v
        return Stacked(out, torch.tensor([v.shape[axis] for v in values]))


def _run_items(prompts: Iterable, interventions: Sequence) -> tuple[Iterator[Item], list]:
    """The prompts as Items, and the run's shared interventions. `interventions` is either shared (a list of
    interventions) or one list per prompt (a list of lists, as long as `prompts`)."""
    per_prompt = bool(interventions) and all(isinstance(x, (list, tuple)) for x in interventions)
    if not per_prompt:
        return (p if isinstance(p, Item) else Item(p) for p in prompts), list(interventions)
    prompts = list(prompts)
    if len(prompts) != len(interventions):
        raise DjinnError(f"{len(interventions)} lists of interventions for {len(prompts)} prompts")
    return (Item(p.prompt if isinstance(p, Item) else p, [*(p.interventions if isinstance(p, Item) else ()), *own])
            for p, own in zip(prompts, interventions)), []


class RunOrder:
    """A run's bookkeeping on the client, for either client: what to feed next (keeping at most `window`
    prompts unanswered, fed in batches) and the results ready in the prompts' order."""

    def __init__(self, items: Iterator[Item], window: int):
        self._numbered, self.window = enumerate(items), window
        self._ahead: list = []  # one prompt more than fed: whether the last was fed
        self.outstanding, self._ready, self._following = 0, {}, 0
        self._fed_last = False

    def feed(self) -> Optional[tuple[list[tuple[int, Item]], bool]]:
        """The next batch to feed and whether it holds the last prompt (None: nothing to feed now)."""
        if self._fed_last or self.outstanding > self.window // 2:  # feed in batches, not a frame a result
            return None
        room = self.window - self.outstanding
        more = self._ahead + list(itertools.islice(self._numbered, room + 1 - len(self._ahead)))
        batch, self._ahead = more[:room], more[room:]
        self.outstanding += len(batch)
        self._fed_last = not self._ahead
        return batch, self._fed_last

    def answered(self, ev: "RunResult") -> None:
        self._ready[ev.index] = ev.result
        self.outstanding -= 1

    def ready(self) -> Iterator[GenerateResult]:
        while self._following in self._ready:
            yield self._ready.pop(self._following)
            self._following += 1


def _ordered_run(channel: RunChannel, items: Iterator[Item], window: int, bar: Any) -> Iterator[GenerateResult]:
    """Feed `items` keeping at most `window` unanswered, and yield the results in the prompts' order."""
    order = RunOrder(items, window)
    channel.feed(*order.feed())
    for ev in channel.events():
        if isinstance(ev, Error):
            raise ev.error
        if isinstance(ev, RunDone):
            break
        if isinstance(ev, RunResult):
            order.answered(ev)
            if bar is not None:
                bar.update(1)
            batch = order.feed()
            if batch is not None:
                channel.feed(*batch)
            yield from order.ready()
    yield from order.ready()

"""The user-facing client: `Client`, `Session`, `Checkpoint`. The same classes serve the embedded engine and
a remote server; only the backend underneath differs."""
from __future__ import annotations

import math
import time
from typing import Any, Iterator, Optional, Protocol, Sequence, Union

import torch

from ..errors import DjinnError
from ..events import Done, Error, GenerateResult, ModelInfo, Paused
from ..interventions import Breakpoint
from ..sites import SiteInfo

Prompt = Union[str, Sequence[int]]
WEIGHT_PART_BYTES = 8 << 20  # a weight travels in parts of at most this, well under any frame limit


class Backend(Protocol):
    def call(self, method: str, *args: Any, **kwargs: Any) -> Any: ...

    def stream(self, sid: str, prompt: Prompt, params: dict) -> Iterator[object]: ...

    def generate(self, sid: str, prompt: Prompt, params: dict) -> GenerateResult:
        """To completion without breakpoints, as one reply (no event a token)."""
        ...

    def attach(self, sid: str) -> Iterator[object]: ...

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

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


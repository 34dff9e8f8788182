"""Tokenizers from a checkpoint folder: Hugging Face `tokenizer.json` or a SentencePiece `.model`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

from ..chat_template import ChatTemplate, load_chat_template


class Tokenizer:
    """Text <-> token ids. `add_bos`: a text prompt that opens a session starts with `bos_id`. `chat_template`:
    the model's, if its folder has one (djinn/chat_template.py). `end_ids`: the tokens a generation ends at by
    default: the end of text, and the ends of turn a chat model's generation_config.json names (Gemma's
    <end_of_turn>, Llama 3's <|eot_id|>)."""

    def __init__(self, backend, kind: str, bos_id: Optional[int], eos_id: Optional[int], add_bos: bool,
                 chat_template: Optional[ChatTemplate] = None, end_ids: Iterable[int] = ()):
        self._backend, self.kind = backend, kind
        self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, add_bos
        self.chat_template = chat_template
        self.end_ids = frozenset(end_ids) | (frozenset() if eos_id is None else {eos_id})

    def decode_after(self, context: list[int], ids: list[int]) -> str:
        """The text of `ids` as it reads after `context` (the tokens before them): a tokenizer that drops the
        space of a word-initial token at the start of a text keeps it here."""
        if not ids:
            return ""
        if not context:
            return self.decode(ids)
        return self.decode(context + ids)[len(self.decode(context)):]

    def encode(self, text: str) -> list[int]:
        if self.kind == "sentencepiece":
            return list(self._backend.encode(text))
        return list(self._backend.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        if self.kind == "sentencepiece":
            return self._backend.decode(list(ids))
        return self._backend.decode(list(ids), skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        if self.kind == "sentencepiece":
            return self._backend.get_piece_size()
        return self._backend.get_vocab_size()


def _token_id(backend, value) -> Optional[int]:
    if isinstance(value, dict):
        value = value.get("content")
    if isinstance(value, str):
        return backend.token_to_id(value)
    return None


def _turn_ends(folder: Path) -> list[int]:
    """generation_config.json's eos_token_id (one id or several)."""
    path = folder / "generation_config.json"
    ids = json.loads(path.read_text()).get("eos_token_id") if path.exists() else None
    ids = [ids] if isinstance(ids, int) else ids if isinstance(ids, list) else []
    return [i for i in ids if isinstance(i, int) and not isinstance(i, bool) and i >= 0]


def load_tokenizer(folder: Path) -> Optional[Tokenizer]:
    """The tokenizer stored in `folder`, or None when there is none."""
    folder = Path(folder)
    if (folder / "tokenizer.json").exists():
        from tokenizers import Tokenizer as HFTokenizer

        backend = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        cfg_path = folder / "tokenizer_config.json"
        tcfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        bos = _token_id(backend, tcfg.get("bos_token"))
        eos = _token_id(backend, tcfg.get("eos_token"))
        # tokenizer_config's add_bos_token where it says; else what the tokenizer's own post-processor does
        # (Llama and Gemma files prepend BOS there, GPT-NeoX and Qwen files do not)
        adds = backend.encode("", add_special_tokens=True).ids[:1] == [bos]
        add_bos = bool(tcfg.get("add_bos_token", adds)) and bos is not None
        return Tokenizer(backend, "hf", bos, eos, add_bos, load_chat_template(folder, tcfg), _turn_ends(folder))
    models = sorted(folder.glob("*.model"))
    if models:
        import sentencepiece as spm

        backend = spm.SentencePieceProcessor(model_file=str(models[0]))
        bos, eos = backend.bos_id(), backend.eos_id()
        return Tokenizer(backend, "sentencepiece", bos if bos >= 0 else None, eos if eos >= 0 else None,
                         add_bos=bos >= 0)
    return None


class IncrementalDecoder:
    """Text of a growing list of token ids, one delta per token, decoding only a short window each time (a
    full decode per token would cost O(n) per token). Holds text back while it ends in an incomplete UTF-8
    sequence, so that the deltas join into exactly the full decode."""

    def __init__(self, tokenizer: Tokenizer, context: list[int] = ()):
        """`context`: the tokens before the first pushed one (at most one is used), so that its text reads
        as it does after them."""
        self.tokenizer = tokenizer
        self.ids: list[int] = list(context[-1:])
        self._prefix = 0  # window start: one token of context keeps leading spaces right
        self._read = len(self.ids)  # ids before this are already in the emitted text

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self._prefix:self._read])
        text = self.tokenizer.decode(self.ids[self._prefix:])
        if text.endswith("\ufffd") or not text.startswith(before):
            return ""  # wait for the rest of a multi-byte character
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(before):]

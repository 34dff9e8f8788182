"""A model's chat template: the Jinja template that turns a list of messages into the model's prompt text.

Loaded from a checkpoint folder as transformers loads it (a `chat_template.jinja` file, else
`tokenizer_config.json`'s `chat_template`: a string, or a list of named templates of which "default" is used)
and rendered as transformers' `apply_chat_template` renders it: jinja2's immutable sandbox with
trim_blocks and lstrip_blocks, a `raise_exception` global, the `tojson` filter that does not escape HTML,
`strftime_now`, and the special tokens of tokenizer_config.json (bos_token, eos_token, ...) as variables.

The rendered text already holds whatever BOS the template writes: it is tokenized without adding another.
Rendering needs jinja2 (the server's dependency); loading does not.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from .errors import InvalidRequest

TEMPLATE_FILE = "chat_template.jinja"
# The tokenizer_config.json entries transformers passes to a template (its `special_tokens_map`)
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatTemplateError(InvalidRequest):
    """The messages could not be rendered: the template refused them (`raise_exception`) or failed on them."""


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    special_tokens: dict[str, Any] = field(default_factory=dict)  # bos_token etc., as the template sees them

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text of `messages` (dicts of role, content, ...), ending with the assistant's header."""
        import jinja2

        template = _compiled(self.source)
        try:
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                 **self.special_tokens)
        except jinja2.TemplateError as e:  # raise_exception, a sandbox refusal, a syntax error
            raise ChatTemplateError(f"the model's chat template refused these messages: {e}") from None
        except Exception as e:  # a template's own bug (a missing key, a type error) on these messages
            raise ChatTemplateError(f"the model's chat template failed on these messages "
                                    f"({type(e).__name__}: {e})") from None


def _token_text(value: Any) -> Any:
    """A special token as tokenizer_config.json stores it: a string, or an AddedToken dict with `content`."""
    return value.get("content") if isinstance(value, dict) else value


def load_chat_template(folder: Path, tokenizer_config: dict) -> Optional[ChatTemplate]:
    """The chat template of a checkpoint folder, or None when it has none."""
    path = Path(folder) / TEMPLATE_FILE
    source = path.read_text(encoding="utf-8") if path.exists() else tokenizer_config.get("chat_template")
    if isinstance(source, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    if not isinstance(source, str) or not source:
        return None
    special = {k: _token_text(tokenizer_config[k]) for k in SPECIAL_TOKENS if tokenizer_config.get(k) is not None}
    extra = tokenizer_config.get("additional_special_tokens")
    if isinstance(extra, list):
        special["additional_special_tokens"] = [_token_text(t) for t in extra]
    return ChatTemplate(source, special)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # jinja's own tojson escapes HTML characters, which would change the prompt
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=32)
def _compiled(source: str):
    """The template compiled once per source: templates come from model folders, a handful per server."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the model's chat template does not compile: {e}") from None

"""API keys and identities.

Keys come from a file (one key per line; blank lines and `#` comments ignored) and/or the environment
variable DJINN_API_KEYS (comma- or whitespace-separated). A caller presents its key as
`Authorization: Bearer <key>` (what the OpenAI client sends) or `X-API-Key: <key>`.

The engine's `owner` of every session and checkpoint is the key's identity: a hash of the key, so the key
itself is never stored beside the sessions or shown in logs and metrics. Another key has another owner, and
the engine refuses it every session it did not create.

With no key configured the server is open: every caller is the single local user, and `djinn serve` binds
the loopback interface only (and says so).
"""
from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path
from typing import Iterable, Mapping, Optional, Union

from ..errors import Unauthorized

ENV_VAR = "DJINN_API_KEYS"
LOCAL_OWNER = "local"


def identity(key: str) -> str:
    return "key-" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]


def read_key_file(path: Union[str, Path]) -> list[str]:
    keys = []
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            keys.append(line)
    return keys


def keys_from_env(env: Optional[Mapping[str, str]] = None) -> list[str]:
    raw = (os.environ if env is None else env).get(ENV_VAR, "")
    return [k for k in raw.replace(",", " ").split() if k]


def load_api_keys(path: Union[None, str, Path] = None, env: Optional[Mapping[str, str]] = None) -> list[str]:
    """Keys from `path` (if given) plus those in DJINN_API_KEYS."""
    return (read_key_file(path) if path else []) + keys_from_env(env)


class Auth:
    def __init__(self, keys: Iterable[str] = ()):
        self._by_digest = {hashlib.sha256(k.encode("utf-8")).digest(): identity(k) for k in keys}

    @property
    def enabled(self) -> bool:
        return bool(self._by_digest)

    @staticmethod
    def presented_key(headers: Mapping[str, str]) -> Optional[str]:
        auth = headers.get("authorization")
        if auth:
            scheme, _, value = auth.partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                return value.strip()
        key = headers.get("x-api-key")
        return key.strip() if key and key.strip() else None

    def identify(self, headers: Mapping[str, str]) -> str:
        """The caller's identity (the engine owner), or Unauthorized."""
        if not self.enabled:
            return LOCAL_OWNER
        key = self.presented_key(headers)
        if key is None:
            raise Unauthorized("this server needs an API key: send 'Authorization: Bearer <key>'")
        digest = hashlib.sha256(key.encode("utf-8")).digest()
        for known, ident in self._by_digest.items():  # constant time per comparison; no early exit on prefix
            if hmac.compare_digest(known, digest):
                return ident
        raise Unauthorized("the API key is not valid for this server")

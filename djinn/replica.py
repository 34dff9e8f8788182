"""Replicas: several servers behind one load balancer, each holding its own sessions and checkpoints.

A replica's ids are `NAME.RANDOM`: its name, a dot, then 128 random bits in URL-safe base64 (which has no
dot), so the part before the first dot names the replica and a balancer can send every call about a session
or checkpoint to the one replica that holds it (`deploy/nginx/djinn.conf`). A server with no replica name
hands out the random part alone.
"""
from __future__ import annotations

import re
import secrets
from typing import Optional

from .errors import InvalidRequest
from .validation import shown

NAME = re.compile(r"[A-Za-z0-9_-]{1,32}")  # URL-safe, and never the separator


def replica_name(name: Optional[str]) -> Optional[str]:
    """`name`, checked as a replica name (None: no replica)."""
    if name is not None and not (isinstance(name, str) and NAME.fullmatch(name)):
        raise InvalidRequest(f"a replica name is 1 to 32 letters, digits, '-' or '_', got {shown(name)}")
    return name


def new_id(replica: Optional[str]) -> str:
    """A fresh unguessable id of that replica."""
    token = secrets.token_urlsafe(16)
    return token if replica is None else f"{replica}.{token}"


def replica_of(ident: object) -> Optional[str]:
    """The replica an id names (None: an id of no replica, or not an id at all)."""
    if isinstance(ident, str) and "." in ident:
        return ident.split(".", 1)[0]
    return None


__all__ = ["new_id", "replica_name", "replica_of"]

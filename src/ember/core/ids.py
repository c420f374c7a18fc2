"""Identifiers: short, lowercase, sortable by creation time, safe in stream ids and URLs."""

from __future__ import annotations

import os
import re
import time
from typing import Final

_ALPHABET: Final = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lowercase
NAME_RE: Final = re.compile(r"^[a-z]([a-z0-9-]{0,38}[a-z0-9])?$")
ENV_NAME_RE: Final = re.compile(r"^[a-z]([a-z0-9-]{0,18}[a-z0-9])?$")


def new_id(prefix: str) -> str:
    """``<prefix>_`` + 10 chars of milliseconds + 16 random chars (like a ULID)."""
    millis = int(time.time() * 1000)
    stamp = "".join(_ALPHABET[(millis >> shift) & 31] for shift in range(45, -5, -5))
    rand = int.from_bytes(os.urandom(10), "big")
    tail = "".join(_ALPHABET[(rand >> shift) & 31] for shift in range(75, -5, -5))
    return f"{prefix}_{stamp}{tail}"

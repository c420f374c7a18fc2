"""API token format: ``ember_<kind>_<30 random base62><6 base62 CRC32 checksum>``.

The fixed prefix and the checksum let secret scanners recognise a leaked Ember token
offline (GitHub's token format does the same). Only a SHA-256 of the token is stored.
"""

from __future__ import annotations

import enum
import hashlib
import re
import secrets
import zlib
from typing import Final

_B62: Final = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_RANDOM_LEN: Final = 30
TOKEN_RE: Final = re.compile(r"^ember_(pat|agt|edg)_([0-9A-Za-z]{30})([0-9A-Za-z]{6})$")


class TokenKind(enum.StrEnum):
    USER = "pat"  # personal access token of a user
    AGENT = "agt"  # a host agent's one-time enrolment token (ember.core.enrollment)
    EDGE = "edg"  # an edge node's identity


def _b62(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        n, r = divmod(n, 62)
        out.append(_B62[r])
    return "".join(reversed(out))


def _checksum(body: str) -> str:
    return _b62(zlib.crc32(body.encode()), 6)


def generate(kind: TokenKind = TokenKind.USER) -> str:
    body = "".join(secrets.choice(_B62) for _ in range(_RANDOM_LEN))
    return f"ember_{kind.value}_{body}{_checksum(body)}"


def looks_valid(token: str) -> bool:
    """Format and checksum only (offline): what a secret scanner checks."""
    m = TOKEN_RE.match(token)
    return m is not None and _checksum(m.group(2)) == m.group(3)


def kind_of(token: str) -> TokenKind | None:
    m = TOKEN_RE.match(token)
    return TokenKind(m.group(1)) if m else None


def digest(token: str) -> str:
    """What the database stores: SHA-256 hex. Tokens are high-entropy, so no salt/KDF."""
    return hashlib.sha256(token.encode()).hexdigest()

"""Node-signed requests: the ``EmberNode`` authorization scheme, sans I/O and sans crypto.

A host's agent holds an Ed25519 key pair; enrolment records the public key on the host's
stream (``host.identity_bound``, ADR-0015). Every later request carries::

    Authorization: EmberNode <host_id>:<unix_seconds>:<signature>

where ``signature`` is the Ed25519 signature (base64url, no padding) of the UTF-8 bytes
of :func:`canonical_string`::

    EMBER-NODE-V1
    <METHOD>
    <path>             percent-decoded URL path, e.g. /v1/hosts/h1/heartbeat
    <query>            the raw query string, '' when there is none
    <unix_seconds>
    <sha256 hex of the body>   (of b'' when there is no body)

lines joined by ``\\n`` without a trailing newline. The server accepts a timestamp at
most :data:`MAX_SKEW_S` seconds from its own clock.

This module builds and parses; signing lives in ember.client.node_auth and verification
in ember.api.node_auth (the only places that touch the ``cryptography`` package).

Errors: :class:`ember.core.tenancy.Unauthorized` (``auth.unauthorized``, like every failed
authentication) for a malformed header or a stale time (:func:`invalid`).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import re
from typing import Final

from ember.core.hosts import HOST_ID_RE, InvalidHost
from ember.core.tenancy import Unauthorized

SCHEME: Final = "EmberNode"
VERSION: Final = "EMBER-NODE-V1"
MAX_SKEW_S: Final = 300
PUBLIC_KEY_BYTES: Final = 32
SIGNATURE_BYTES: Final = 64

_B64URL_RE: Final = re.compile(r"^[A-Za-z0-9_-]*$")
_TIMESTAMP_RE: Final = re.compile(r"^[0-9]{1,12}$")
_HINT: Final = "sign with the node's key ('EmberNode <host_id>:<unix_seconds>:<signature>')"


def invalid(
    message: str, *, hint: str | None = _HINT, detail: dict[str, object] | None = None
) -> Unauthorized:
    """A refused node authentication: the code of any failed authentication
    (``auth.unauthorized``, 401); a caller learns why only from the message."""
    return Unauthorized(message, hint=hint, detail=detail)


def b64url_encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def b64url_decode(text: str, length: int) -> bytes:
    """Strict base64url without padding of exactly ``length`` bytes; ValueError otherwise.

    Strict means canonical too: trailing bits that another encoder would leave as zero
    must be zero, so every value has exactly one spelling."""
    if not isinstance(text, str) or not _B64URL_RE.match(text):
        raise ValueError("not base64url")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not base64url") from exc
    if len(raw) != length or b64url_encode(raw) != text:
        raise ValueError(f"not {length} bytes in canonical base64url")
    return raw


def check_public_key(text: str) -> str:
    """The public key as the wire carries it (raw 32-byte Ed25519 key, base64url without
    padding); raises InvalidHost naming the field ``public_key``."""
    try:
        b64url_decode(text, PUBLIC_KEY_BYTES)
    except ValueError:
        raise InvalidHost(
            "public_key must be a raw 32-byte Ed25519 public key in base64url without padding",
            hint="43 characters of A-Z, a-z, 0-9, '-' and '_'",
            detail={"field": "public_key"},
        ) from None
    return text


def body_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def canonical_string(method: str, path: str, query: str, timestamp: int, body: bytes) -> bytes:
    """What a node signs for one request (see the module docstring)."""
    return "\n".join(
        (VERSION, method.upper(), path, query, str(timestamp), body_digest(body))
    ).encode()


def format_header(host_id: str, timestamp: int, signature: bytes) -> str:
    """The ``Authorization`` header value."""
    return f"{SCHEME} {host_id}:{timestamp}:{b64url_encode(signature)}"


@dataclasses.dataclass(frozen=True)
class NodeCredentials:
    """What an ``EmberNode`` header claims (nothing verified yet)."""

    host_id: str
    timestamp: int
    signature: bytes


def is_node_scheme(header: str) -> bool:
    scheme, _, _ = header.strip().partition(" ")
    return scheme.lower() == SCHEME.lower()


def parse_header(header: str) -> NodeCredentials:
    """The credentials of an ``Authorization: EmberNode ...`` value; Unauthorized when it
    is malformed (no lookup, no crypto)."""
    scheme, _, rest = header.strip().partition(" ")
    if scheme.lower() != SCHEME.lower():
        raise invalid(f"not an {SCHEME} authorization")
    parts = rest.strip().split(":")
    if len(parts) != 3:
        raise invalid(f"malformed {SCHEME} authorization: expected host_id:unix_seconds:signature")
    host_id, timestamp, signature = parts
    if not HOST_ID_RE.match(host_id):
        raise invalid(f"malformed {SCHEME} authorization: bad host id")
    if not _TIMESTAMP_RE.match(timestamp):
        raise invalid(f"malformed {SCHEME} authorization: the time is not unix seconds")
    try:
        raw = b64url_decode(signature, SIGNATURE_BYTES)
    except ValueError:
        raise invalid(
            f"malformed {SCHEME} authorization: the signature is not 64 bytes of base64url"
        ) from None
    return NodeCredentials(host_id, int(timestamp), raw)


def check_timestamp(timestamp: int, now: float, max_skew_s: int = MAX_SKEW_S) -> None:
    """Refuse a request signed more than ``max_skew_s`` seconds away from ``now``: a
    captured request cannot be replayed later than that."""
    skew = timestamp - now
    if abs(skew) > max_skew_s:
        raise invalid(
            f"the request was signed {abs(skew):.0f}s "
            f"{'ahead of' if skew > 0 else 'behind'} the server's clock "
            f"(at most {max_skew_s}s allowed)",
            hint="sync the host's clock (NTP) and send the request again",
            detail={"max_skew_s": max_skew_s},
        )

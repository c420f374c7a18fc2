"""Verifying node-signed requests (``Authorization: EmberNode ...``, ADR-0015).

The header format and the signed string are ember.core.node_auth's; this module adds the
Ed25519 check (``cryptography``) and the key lookup: the public key the ``scheduling``
projection folded from the host's last ``host.identity_bound`` (``view_hosts.public_key``).

Every failure is 401 ``auth.unauthorized``. A stale or future timestamp says so (a host
with a drifting clock needs to know); an unknown host, a host without an identity and a
bad signature share one message.
"""

from __future__ import annotations

import time

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ember.api.service import Tenancy
from ember.core.hosts import InvalidHost
from ember.core.node_auth import (
    PUBLIC_KEY_BYTES,
    NodeCredentials,
    b64url_decode,
    canonical_string,
    check_public_key,
    check_timestamp,
    invalid,
    parse_header,
)
from ember.core.tenancy import Principal


def load_public_key(text: str) -> Ed25519PublicKey:
    """The key a node enrols with, checked (InvalidHost, ``detail.field = public_key``)."""
    raw = b64url_decode(check_public_key(text), PUBLIC_KEY_BYTES)
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise InvalidHost(
            "public_key is not an Ed25519 public key", detail={"field": "public_key"}
        ) from None


def verify(
    public_key: str | None,
    creds: NodeCredentials,
    *,
    method: str,
    path: str,
    query: str,
    body: bytes,
    now: float,
) -> None:
    """Raise Unauthorized unless ``creds`` sign this request with ``public_key`` (the
    host's enrolled key; None: the host has no identity) within the allowed clock skew."""
    check_timestamp(creds.timestamp, now)
    bad = invalid(
        f"the node signature for host {creds.host_id!r} does not verify",
        hint="sign with the key the host enrolled with, or enrol the host again",
    )
    if public_key is None:
        raise bad
    try:
        key = load_public_key(public_key)
        key.verify(creds.signature, canonical_string(method, path, query, creds.timestamp, body))
    except (InvalidHost, InvalidSignature):
        raise bad from None


def authenticate(
    svc: Tenancy,
    header: str,
    *,
    method: str,
    path: str,
    query: str,
    body: bytes,
    now: float | None = None,
) -> Principal:
    """The node principal of a signed request (blocking: it reads the views)."""
    creds = parse_header(header)
    at = time.time() if now is None else now
    check_timestamp(creds.timestamp, at)  # before the lookup: stale requests cost nothing
    rows = svc.query("SELECT public_key FROM view_hosts WHERE host_id = %s", [creds.host_id])
    verify(
        rows[0]["public_key"] if rows else None,
        creds,
        method=method,
        path=path,
        query=query,
        body=body,
        now=at,
    )
    return Principal.node(creds.host_id)

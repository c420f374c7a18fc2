"""Node-signed requests (ADR-0015): the canonical string and header of
ember.core.node_auth, verification (ember.api.node_auth) and signing and key files
(ember.client.node_auth)."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ember.api.node_auth import load_public_key, verify
from ember.client.node_auth import NodeAuth, NodeIdentity, NodeKeyInvalid
from ember.core.hosts import InvalidHost
from ember.core.node_auth import (
    MAX_SKEW_S,
    NodeCredentials,
    b64url_decode,
    b64url_encode,
    canonical_string,
    check_public_key,
    check_timestamp,
    format_header,
    is_node_scheme,
    parse_header,
)
from ember.core.tenancy import Unauthorized

NOW = 1_800_000_000
BODY = b'{"report":{"vms":3}}'


def test_the_canonical_string_is_exactly_the_documented_one() -> None:
    got = canonical_string("post", "/v1/hosts/h1/heartbeat", "a=1&b=%2F", NOW, BODY)
    assert got == (
        b"EMBER-NODE-V1\nPOST\n/v1/hosts/h1/heartbeat\na=1&b=%2F\n1800000000\n"
        + hashlib.sha256(BODY).hexdigest().encode()
    )
    # No body hashes the empty string; no query is an empty line.
    empty = canonical_string("GET", "/v1/hosts/h1/allocations", "", NOW, b"")
    assert empty.split(b"\n") == [
        b"EMBER-NODE-V1",
        b"GET",
        b"/v1/hosts/h1/allocations",
        b"",
        b"1800000000",
        b"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    ]
    # The path is text: a decoded non-ASCII segment is signed as UTF-8.
    assert "/v1/instances/ü".encode() in canonical_string("GET", "/v1/instances/ü", "", 1, b"")


def test_base64url_is_strict_and_canonical() -> None:
    raw = bytes(range(32))
    text = b64url_encode(raw)
    assert len(text) == 43 and "=" not in text
    assert b64url_decode(text, 32) == raw
    # 43 characters carry 258 bits for 256: the last one has 2 spare bits, and a spelling
    # with them set decodes to the same bytes. Refused, so one key has one text.
    assert text[-1] == "8"
    assert base64.urlsafe_b64decode(text[:-1] + "9=") == raw  # a lenient decoder takes it
    for bad in (
        text[:-1] + "9",
        text + "=",
        text[:-1],
        text + "A",
        "+" + text[1:],
        "/" + text[1:],
        " " + text,
    ):
        with pytest.raises(ValueError):
            b64url_decode(bad, 32)
    assert check_public_key(text) == text
    with pytest.raises(InvalidHost) as err:
        check_public_key(text[:-1])
    assert err.value.detail == {"field": "public_key"}


def test_headers_round_trip_and_malformed_ones_are_refused() -> None:
    sig = bytes(range(64))
    header = format_header("web-1", NOW, sig)
    assert header.startswith("EmberNode web-1:1800000000:")
    assert parse_header(header) == NodeCredentials("web-1", NOW, sig)
    assert parse_header("embernode " + header.split(" ", 1)[1]).host_id == "web-1"
    assert is_node_scheme(header) and not is_node_scheme("Bearer ember_pat_x")
    encoded = b64url_encode(sig)
    for bad in (
        "",
        "Bearer x",
        "EmberNode",
        "EmberNode web-1",
        f"EmberNode web-1:{NOW}",
        f"EmberNode web-1:{NOW}:{encoded}:extra",
        f"EmberNode Web_1:{NOW}:{encoded}",
        f"EmberNode web-1:-5:{encoded}",
        f"EmberNode web-1:1.5:{encoded}",
        f"EmberNode web-1:{NOW}:{encoded}==",
        f"EmberNode web-1:{NOW}:{b64url_encode(sig[:63])}",
        f"EmberNode web-1:{NOW}:{encoded[:-1]}!",
    ):
        with pytest.raises(Unauthorized) as err:
            parse_header(bad)
        assert err.value.code == "auth.unauthorized"


def test_the_clock_skew_window_is_300_seconds_either_way() -> None:
    for skew in (0, 1, -1, MAX_SKEW_S, -MAX_SKEW_S):
        check_timestamp(NOW + skew, NOW)
    for skew, word in ((MAX_SKEW_S + 1, "ahead of"), (-MAX_SKEW_S - 1, "behind"), (-86400, "")):
        with pytest.raises(Unauthorized) as err:
            check_timestamp(NOW + skew, NOW)
        assert word in err.value.message and "NTP" in (err.value.hint or "")


def signed(identity: NodeIdentity, *, at: int = NOW, **changes: object) -> NodeCredentials:
    request = {"method": "POST", "path": "/v1/hosts/h1/heartbeat", "query": "", "body": BODY}
    request.update(changes)
    message = canonical_string(
        str(request["method"]),
        str(request["path"]),
        str(request["query"]),
        at,
        request["body"],  # type: ignore[arg-type]
    )
    return NodeCredentials("h1", at, identity.sign(message))


def check(key: str | None, creds: NodeCredentials, *, now: float = NOW, **request: object) -> None:
    fields: dict[str, object] = {
        "method": "POST",
        "path": "/v1/hosts/h1/heartbeat",
        "query": "",
        "body": BODY,
    }
    fields.update(request)
    verify(
        key,
        creds,
        method=str(fields["method"]),
        path=str(fields["path"]),
        query=str(fields["query"]),
        body=fields["body"],  # type: ignore[arg-type]
        now=now,
    )


def test_a_signature_verifies_only_for_its_key_request_and_time() -> None:
    node, other = NodeIdentity.generate(), NodeIdentity.generate()
    key = node.public_key_b64
    check(key, signed(node))
    check(key, signed(node), now=NOW + MAX_SKEW_S)
    refusals: list[tuple[str | None, NodeCredentials, dict[str, object]]] = [
        (other.public_key_b64, signed(node), {}),  # not the enrolled key
        (key, signed(other), {}),  # signed by someone else
        (None, signed(node), {}),  # the host has no identity
        (key, signed(node), {"body": BODY + b" "}),  # tampered body
        (key, signed(node), {"body": b""}),
        (key, signed(node), {"path": "/v1/hosts/h2/heartbeat"}),  # another path
        (key, signed(node), {"method": "PUT"}),
        (key, signed(node), {"query": "x=1"}),
        (key, signed(node, at=NOW - MAX_SKEW_S - 1), {}),  # too old: a replay
        (key, signed(node, at=NOW + MAX_SKEW_S + 1), {}),  # from the future
        # The time in the header is the signed one: moving it breaks the signature.
        (key, NodeCredentials("h1", NOW + 1, signed(node).signature), {}),
    ]
    for public_key, creds, request in refusals:
        with pytest.raises(Unauthorized):
            check(public_key, creds, **request)


def test_public_keys_must_be_32_raw_bytes() -> None:
    node = NodeIdentity.generate()
    assert len(node.public_key_raw) == 32
    load_public_key(node.public_key_b64)
    for bad in ("", node.public_key_b64 + "A", b64url_encode(b"\x00" * 31)):
        with pytest.raises(InvalidHost):
            load_public_key(bad)


# -- key files and signing (the client side) --------------------------------------------


def test_a_key_file_is_created_once_with_mode_0600_and_loaded_again(tmp_path: Path) -> None:
    path = tmp_path / "state" / "node.key"
    made = NodeIdentity.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    again = NodeIdentity.load_or_create(path)
    assert again.public_key_b64 == made.public_key_b64
    assert NodeIdentity.load(path).public_key_b64 == made.public_key_b64
    assert [p.name for p in path.parent.iterdir()] == ["node.key"], "no temporary file left"


def test_a_raw_seed_loads_and_unsafe_or_foreign_files_are_refused(tmp_path: Path) -> None:
    seed = os.urandom(32)
    raw = tmp_path / "raw.key"
    raw.write_bytes(seed)
    raw.chmod(0o600)
    from_seed = NodeIdentity.load(raw)
    assert from_seed.public_key_b64 == NodeIdentity.load(raw).public_key_b64

    raw.chmod(0o640)
    with pytest.raises(NodeKeyInvalid) as err:
        NodeIdentity.load(raw)
    assert "chmod 600" in (err.value.hint or "")

    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(b"not a key")
    garbage.chmod(0o600)
    ec_key = tmp_path / "ec.key"
    ec_key.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ec_key.chmod(0o600)
    for path in (garbage, ec_key, tmp_path / "missing.key"):
        with pytest.raises(NodeKeyInvalid) as err:
            NodeIdentity.load(path)
        assert err.value.code == "node.key_invalid"


def test_node_auth_signs_the_request_as_sent() -> None:
    node = NodeIdentity.generate()
    auth = NodeAuth(node, "h1", clock=lambda: NOW + 0.9)
    request = httpx.Request(
        "POST",
        "http://api.test/v1/instances/ins%20a/reports?x=1&y=%2F",
        json={"host_id": "h1", "state": "healthy"},
    )
    flow = auth.auth_flow(request)
    sent = next(flow)
    creds = parse_header(sent.headers["Authorization"])
    assert (creds.host_id, creds.timestamp) == ("h1", NOW)
    check(
        node.public_key_b64,
        creds,
        method="POST",
        path="/v1/instances/ins a/reports",  # decoded, as a server routes it
        query="x=1&y=%2F",  # raw
        body=request.content,
    )
    assert NodeAuth.requires_request_body is True

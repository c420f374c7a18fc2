"""A host's node identity: its Ed25519 key, and signing every request with it (ADR-0015).

``NodeIdentity`` loads the private key from a file (PEM PKCS#8, or the raw 32-byte seed)
or creates one, readable by its owner only; ``public_key_b64`` is what enrolment sends
(``Client.enroll``). ``NodeAuth`` is an ``httpx.Auth`` that signs each request as
ember.core.node_auth specifies (``Authorization: EmberNode <host_id>:<unix_seconds>:<sig>``),
afresh on every send, so the client's retries carry a current timestamp::

    identity = NodeIdentity.load_or_create(data_dir / "node.key")
    client.enroll(token, host_id=..., public_key=identity.public_key_b64, ...)
    agent = Client(url, None, auth=NodeAuth(identity, host_id))

Errors::

    ValidationFailed └── NodeKeyInvalid   node.key_invalid   (unreadable, unsafe or not Ed25519)
"""

from __future__ import annotations

import os
import stat
import tempfile
import time
from collections.abc import Callable, Generator
from pathlib import Path

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ember.core.errors import ValidationFailed
from ember.core.node_auth import b64url_encode, canonical_string, format_header

_RAW_SEED_BYTES = 32


class NodeKeyInvalid(ValidationFailed):
    code = "node.key_invalid"


class NodeIdentity:
    """An Ed25519 private key and what is derived from it."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key

    @classmethod
    def generate(cls) -> NodeIdentity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: Path) -> NodeIdentity:
        """Read the key at ``path``: PEM (PKCS#8) or the raw 32-byte seed. A key file that
        its group or others may access is refused, like ssh does."""
        try:
            with path.open("rb") as f:
                mode = os.fstat(f.fileno()).st_mode
                data = f.read(64 * 1024)
        except OSError as exc:
            raise NodeKeyInvalid(
                f"cannot read the node key {path}: {exc.strerror or exc}",
                detail={"path": str(path)},
            ) from exc
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise NodeKeyInvalid(
                f"the node key {path} is accessible by other users (mode {mode & 0o777:04o})",
                hint=f"chmod 600 {path}",
                detail={"path": str(path)},
            )
        return cls(_parse_key(data, path))

    @classmethod
    def load_or_create(cls, path: Path) -> NodeIdentity:
        """The key at ``path``, or a new one written there with mode 0600. The file
        appears complete or not at all (written aside, then linked into place), and of
        two processes creating it at once both end up with the same key."""
        if path.exists():
            return cls.load(path)
        identity = cls.generate()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(identity.private_pem())
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:  # another process won the race: use its key
                return cls.load(path)
        finally:
            os.unlink(tmp)
        return identity

    def private_pem(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def public_key_raw(self) -> bytes:
        return self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def public_key_b64(self) -> str:
        """The public key as enrolment sends it: raw 32 bytes, base64url without padding."""
        return b64url_encode(self.public_key_raw)

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)


def _parse_key(data: bytes, path: Path) -> Ed25519PrivateKey:
    if len(data) == _RAW_SEED_BYTES:
        return Ed25519PrivateKey.from_private_bytes(data)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise NodeKeyInvalid(
            f"the node key {path} is neither a PEM private key nor a raw 32-byte seed",
            hint="remove it to have a new one created, then enrol the host again",
            detail={"path": str(path)},
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise NodeKeyInvalid(
            f"the node key {path} is not an Ed25519 key", detail={"path": str(path)}
        )
    return key


class NodeAuth(httpx.Auth):
    """Signs every request as the node of ``host_id`` (the body is part of the signature,
    so httpx must read it first: ``requires_request_body``)."""

    requires_request_body = True

    def __init__(
        self, identity: NodeIdentity, host_id: str, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.identity = identity
        self.host_id = host_id
        self.clock = clock

    def sign(self, request: httpx.Request) -> None:
        timestamp = int(self.clock())
        message = canonical_string(
            request.method,
            request.url.path,  # percent-decoded, as the server routes it
            request.url.query.decode("ascii"),  # raw, as sent
            timestamp,
            request.content,
        )
        request.headers["Authorization"] = format_header(
            self.host_id, timestamp, self.identity.sign(message)
        )

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        self.sign(request)
        yield request

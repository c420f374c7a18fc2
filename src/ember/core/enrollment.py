"""Agent enrolment: one-time tokens that turn a host's key pair into its node identity.

An operator creates an enrolment token (``ember_agt_...``, shown once); only its SHA-256
is kept, as the stream ``enrollment-<sha256(token)[:32]>``. The host's agent sends the
token once with its facts and its Ed25519 public key; the API then appends, in one
transaction (ADR-0015):

==================================  =====================================================
stream                              events
==================================  =====================================================
``enrollment-<sha256(token)[:32]>`` host.enrollment_token_created, host.enrolled
``host-<host_id>``                  host.registered (when new facts), host.identity_bound
==================================  =====================================================

The enrolment stream is appended at the version read, so of two racing enrolments with
one token exactly one is written; the other is decided again and finds the token used.
The same token, host and key again is a retry (the agent lost the answer): it writes
nothing and succeeds, also after the token's expiry.

Every refusal of the token itself looks the same (unknown, expired, used, made for
another host): a caller holding a guessed or stolen token learns nothing from the answer.

Errors: Unauthorized (``auth.unauthorized``: the token, :func:`refused`), Forbidden
(replacing a host's identity with a token not made for it), ValidationFailed
(``expires_in_s``) and InvalidHost (``host_id``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable
from typing import Final

from ember.core.errors import ValidationFailed
from ember.core.events import EventData, EventRegistry, RecordedEvent
from ember.core.hosts import HOST_ID_RE, HostRecord, InvalidHost
from ember.core.tenancy import Forbidden, Unauthorized

REGISTRY = EventRegistry()

DEFAULT_EXPIRES_S: Final = 3600
MIN_EXPIRES_S: Final = 60
MAX_EXPIRES_S: Final = 7 * 24 * 3600
REFUSED: Final = "enrollment token invalid, expired or used"


def refused() -> Unauthorized:
    """The token does not (or no longer) allow this enrolment: one answer for every
    reason (401 ``auth.unauthorized``, like any failed authentication)."""
    return Unauthorized(
        REFUSED, hint="ask a platform operator for a new one: 'ember hosts enroll-token'"
    )


def enrollment_stream(token_hash: str) -> str:
    return f"enrollment-{token_hash[:32]}"


@REGISTRY.register
class EnrollmentTokenCreated(EventData):
    event_type = "host.enrollment_token_created"
    token_hash: str
    """SHA-256 hex of the token (the secret itself is never stored)."""
    host_id: str | None = None
    """The only host the token may enrol; None: any host id."""
    expires_at: dt.datetime
    created_by: str
    """The operator's user id."""


@REGISTRY.register
class HostEnrolled(EventData):
    """The token was used: it enrolled ``host_id`` with ``public_key``."""

    event_type = "host.enrolled"
    token_hash: str
    host_id: str
    public_key: str


@dataclasses.dataclass
class EnrollmentState:
    created: EnrollmentTokenCreated | None = None
    enrolled: HostEnrolled | None = None
    version: int = 0


def fold_enrollment(events: Iterable[RecordedEvent]) -> EnrollmentState:
    state = EnrollmentState()
    for e in events:
        state.version = e.stream_version
        if e.type == "host.enrollment_token_created":
            state.created = EnrollmentTokenCreated.model_validate(e.data)
        elif e.type == "host.enrolled":
            state.enrolled = HostEnrolled.model_validate(e.data)
    return state


def new_token(
    token_hash: str, host_id: str | None, expires_in_s: int, *, now: dt.datetime, created_by: str
) -> EnrollmentTokenCreated:
    """The event recording a new token, its input checked."""
    if host_id is not None and not HOST_ID_RE.match(host_id):
        raise InvalidHost(
            f"invalid host id {host_id!r}: lowercase letters, digits and '-'",
            detail={"field": "host_id"},
        )
    if not MIN_EXPIRES_S <= expires_in_s <= MAX_EXPIRES_S:
        raise ValidationFailed(
            f"expires_in_s must be between {MIN_EXPIRES_S} and {MAX_EXPIRES_S} (7 days)",
            detail={"field": "expires_in_s"},
        )
    return EnrollmentTokenCreated(
        token_hash=token_hash,
        host_id=host_id,
        expires_at=now + dt.timedelta(seconds=expires_in_s),
        created_by=created_by,
    )


def decide_enroll(
    state: EnrollmentState,
    *,
    token_hash: str,
    host_id: str,
    public_key: str,
    now: dt.datetime,
) -> list[EventData]:
    """``[host.enrolled]`` to consume the token; ``[]`` for a retry of the enrolment that
    consumed it (same host, same key); :func:`refused` otherwise."""
    created = state.created
    if created is None or created.token_hash != token_hash:
        raise refused()
    done = state.enrolled
    if done is not None:
        if (done.host_id, done.public_key) == (host_id, public_key):
            return []
        raise refused()
    if created.expires_at <= now or created.host_id not in (None, host_id):
        raise refused()
    return [HostEnrolled(token_hash=token_hash, host_id=host_id, public_key=public_key)]


def check_rebind(token: EnrollmentTokenCreated, host: HostRecord, host_id: str) -> None:
    """A host that already has an identity is re-enrolled (its key replaced) only with a
    token made for that very host: a leaked any-host token cannot take a running host's
    identity over, it can only enrol a host that has none yet."""
    if host.public_key is not None and token.host_id is None:
        raise Forbidden(
            f"host {host_id!r} already has a node identity: replacing it needs an "
            "enrollment token made for that host",
            hint=f"ember hosts enroll-token --host-id {host_id}",
            detail={"host_id": host_id},
        )

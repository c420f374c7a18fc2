"""Agent enrolment: operators create one-time tokens; an agent trades one for its node
identity (ember.core.enrollment, ADR-0015).

``enroll`` is the one unauthenticated write of the API: the token in the body is the
credential. It appends the token's consumption (``host.enrolled`` on the enrolment stream,
at the version read) and the host's registration and key (``host.registered`` when the
facts are new, ``host.identity_bound`` when the key is) in one transaction, so a token is
used at most once however many requests race, and a used token never leaves a host half
enrolled. Then it waits for the ``scheduling`` projection, so the agent's first signed
request finds its key.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping

from ember.api.hosts import PROJECTION, Hosts, registration
from ember.api.node_auth import load_public_key
from ember.core import tokens
from ember.core.enrollment import (
    EnrollmentTokenCreated,
    check_rebind,
    decide_enroll,
    enrollment_stream,
    fold_enrollment,
    new_token,
    refused,
)
from ember.core.errors import ConcurrencyConflict
from ember.core.events import Metadata, NewEvent
from ember.core.hosts import decide_bind, fold_host, host_stream
from ember.core.tenancy import Principal, check_operator
from ember.store.eventlog import StreamAppend

_ATTEMPTS = 5


class Enrollment:
    def __init__(self, hosts: Hosts) -> None:
        self.hosts = hosts
        self.t = hosts.t

    def create_token(
        self, who: Principal, *, host_id: str | None, expires_in_s: int
    ) -> tuple[str, EnrollmentTokenCreated]:
        """A new one-time token (the secret, shown once) for ``host_id`` or any host."""
        check_operator(who, "create enrollment tokens")
        secret = tokens.generate(tokens.TokenKind.AGENT)
        created = new_token(
            tokens.digest(secret),
            host_id,
            expires_in_s,
            now=dt.datetime.now(dt.UTC),
            created_by=who.user_id,
        )
        # A fresh random token: the stream is new (a conflict could only be a bug).
        self.t.log.append(
            enrollment_stream(created.token_hash),
            0,
            [NewEvent.of(created, Metadata(actor=who.user_id))],
        )
        return secret, created

    def enroll(
        self,
        *,
        token: str,
        host_id: str,
        public_key: str,
        vcpus: int,
        memory_mb: int,
        disk_mb: int,
        labels: Mapping[str, str],
        region: str,
        address: str,
    ) -> bool:
        """Bind ``public_key`` to ``host_id`` with a one-time ``token``; True when this call
        enrolled, False for a retry of the enrolment that used the token (nothing is
        written). The input is checked before the token (422 names the field and leaves
        the token unused)."""
        registered = registration(
            host_id,
            vcpus=vcpus,
            memory_mb=memory_mb,
            disk_mb=disk_mb,
            labels=labels,
            region=region,
            address=address,
        )
        load_public_key(public_key)
        if not tokens.looks_valid(token) or tokens.kind_of(token) is not tokens.TokenKind.AGENT:
            raise refused()
        token_hash = tokens.digest(token)
        stream, hosts_stream = enrollment_stream(token_hash), host_stream(host_id)
        meta = Metadata(actor=f"host:{host_id}")
        for attempt in range(_ATTEMPTS):
            # The host first, then the token: a racing enrolment with the same token that
            # binds the host between the two reads then shows as a used token (401), not
            # as a host with an identity our token may not replace (403). A host change
            # after the first read fails the append below (expected version) and is
            # decided again.
            host_events = self.t.log.read_stream_all(hosts_stream)
            state = fold_enrollment(self.t.log.read_stream_all(stream))
            consumed = decide_enroll(
                state,
                token_hash=token_hash,
                host_id=host_id,
                public_key=public_key,
                now=dt.datetime.now(dt.UTC),
            )
            if not consumed:
                # A retry: the first call may have appended without folding yet.
                host_events = self.t.log.read_stream_all(hosts_stream)
                if host_events:
                    self.t.sync(host_events[-1].cursor, PROJECTION)
                return False
            assert state.created is not None
            host = fold_host(host_events)
            check_rebind(state.created, host, host_id)
            appends = [
                StreamAppend(stream, state.version, [NewEvent.of(e, meta) for e in consumed])
            ]
            bound = decide_bind(host, registered, public_key)
            if bound:
                appends.append(
                    StreamAppend(hosts_stream, host.version, [NewEvent.of(e, meta) for e in bound])
                )
            try:
                results = self.t.log.append_many(appends)
            except ConcurrencyConflict:
                # Another enrolment with this token, or a plan on the host: decide again.
                if attempt == _ATTEMPTS - 1:
                    raise
                continue
            self.t.sync(max(r.cursor for r in results), PROJECTION)
            self.hosts.beat(host_id, None)  # like a registration, enrolling is a heartbeat
            return True
        raise AssertionError("unreachable")

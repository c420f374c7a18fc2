"""Events: the envelope, the cursor, and the registry of event types and their upcasters.

The contract lives in docs/specs/events.md. This module is pure: it validates and shapes
events; ember.store persists them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, Final, Literal, TypeVar

import pydantic

from ember.core.errors import InvalidEvent, UnknownEventType, ValidationFailed

STREAM_ID_RE: Final = re.compile(r"^[a-z0-9][a-z0-9._:-]{0,199}$")
EVENT_TYPE_RE: Final = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")

#: ``expected_version`` value that skips the optimistic-concurrency check.
ANY: Final = "any"
ExpectedVersion = int | Literal["any"]


def check_stream_id(stream_id: str) -> str:
    """Return ``stream_id`` or raise: ``<kind>-<id>``, lowercase, 1..200 characters."""
    if not isinstance(stream_id, str) or not STREAM_ID_RE.match(stream_id):
        raise ValidationFailed(
            f"invalid stream id {stream_id!r}",
            hint="use 1-200 characters of a-z, 0-9 and . _ : -, starting with a letter or digit",
            detail={"field": "stream_id"},
        )
    return stream_id


def check_expected_version(expected: ExpectedVersion) -> ExpectedVersion:
    if expected == ANY:
        return expected
    if isinstance(expected, bool) or not isinstance(expected, int) or expected < 0:
        raise ValidationFailed(
            f"invalid expected version {expected!r}",
            hint="pass the stream version you last read (0 for a new stream) or 'any'",
            detail={"field": "expected_version"},
        )
    return expected


@dataclasses.dataclass(frozen=True, order=True)
class Cursor:
    """A point in the commit-safe global order ``(xid, position)``; serialised ``"xid-pos"``."""

    xid: int
    position: int

    def __str__(self) -> str:
        return f"{self.xid}-{self.position}"

    @classmethod
    def parse(cls, text: str) -> Cursor:
        m = re.fullmatch(r"(\d{1,20})-(\d{1,20})", text.strip()) if isinstance(text, str) else None
        if not m:
            raise ValidationFailed(
                f"invalid cursor {text!r}",
                hint="a cursor looks like '812-4031'; '0-0' reads from the beginning",
                detail={"field": "cursor"},
            )
        return cls(int(m.group(1)), int(m.group(2)))


ZERO: Final = Cursor(0, 0)


class Metadata(pydantic.BaseModel):
    """Who and why: carried with every event, never interpreted by projections."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    actor: str | None = None
    causation_id: str | None = None
    correlation_id: str | None = None
    idempotency_key: str | None = None
    trace_id: str | None = None
    leader_epoch: int | None = None
    """Set on the controller's writes: the lease epoch they were fenced with."""


class EventData(pydantic.BaseModel):
    """Base of every event payload model. Subclasses set ``event_type`` and ``schema_version``."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    event_type: ClassVar[str]
    schema_version: ClassVar[int] = 1


@dataclasses.dataclass(frozen=True)
class NewEvent:
    """An event about to be appended: validated, with its payload as plain JSON data."""

    type: str
    data: Mapping[str, Any]
    schema_version: int = 1
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, payload: EventData, metadata: Metadata | None = None) -> NewEvent:
        return cls(
            type=payload.event_type,
            data=payload.model_dump(mode="json"),
            schema_version=payload.schema_version,
            metadata=(metadata or Metadata()).model_dump(mode="json", exclude_none=True),
        )


@dataclasses.dataclass(frozen=True)
class RecordedEvent:
    """An event as stored, upcast to the current schema version of its type."""

    position: int
    xid: int
    stream_id: str
    stream_version: int
    type: str
    schema_version: int
    data: Mapping[str, Any]
    metadata: Mapping[str, Any]
    recorded_at: dt.datetime

    @property
    def cursor(self) -> Cursor:
        return Cursor(self.xid, self.position)


@dataclasses.dataclass(frozen=True)
class AppendResult:
    """What one append wrote; also what a retried idempotency key answers."""

    stream_id: str
    first_version: int
    last_version: int
    first_position: int
    last_position: int
    xid: int

    @property
    def cursor(self) -> Cursor:
        return Cursor(self.xid, self.last_position)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> AppendResult:
        return cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls)})


Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
E = TypeVar("E", bound=type[EventData])


class EventRegistry:
    """Known event types, their current schema versions, and upcasters from older ones.

    Appends are validated against the registered model; reads are upcast step by step
    (N -> N+1 -> ...) to the current version. History is never rewritten.
    """

    def __init__(self) -> None:
        self._models: dict[str, type[EventData]] = {}
        self._upcasters: dict[tuple[str, int], Upcaster] = {}

    def register(self, model: E) -> E:
        """Register a payload model; usable as a class decorator."""
        name = model.event_type
        if not EVENT_TYPE_RE.match(name):
            raise ValueError(f"event type {name!r} must be dotted lowercase, like 'app.created'")
        if name in self._models and self._models[name] is not model:
            raise ValueError(f"event type {name!r} registered twice")
        if model.schema_version < 1:
            raise ValueError(f"{name}: schema_version starts at 1")
        self._models[name] = model
        return model

    def upcaster(self, event_type: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
        """Register ``fn(data_at_from_version) -> data_at_from_version_plus_1``."""

        def deco(fn: Upcaster) -> Upcaster:
            key = (event_type, from_version)
            if key in self._upcasters:
                raise ValueError(f"upcaster for {event_type} v{from_version} registered twice")
            self._upcasters[key] = fn
            return fn

        return deco

    def include(self, other: EventRegistry) -> None:
        """Merge another registry (one per domain module) into this one."""
        for model in other._models.values():
            self.register(model)
        for (event_type, version), fn in other._upcasters.items():
            self.upcaster(event_type, version)(fn)

    @property
    def types(self) -> frozenset[str]:
        return frozenset(self._models)

    def model(self, event_type: str) -> type[EventData]:
        try:
            return self._models[event_type]
        except KeyError:
            raise UnknownEventType(
                f"unknown event type {event_type!r}",
                hint="event types are fixed by the platform; see docs/specs/events.md",
                detail={"type": event_type},
            ) from None

    def validate(self, event: NewEvent) -> NewEvent:
        """Check an event against its registered model; return it normalised."""
        model = self.model(event.type)
        if event.schema_version != model.schema_version:
            raise InvalidEvent(
                f"{event.type}: schema version {event.schema_version} is not the current "
                f"version {model.schema_version}",
                hint="new events are always written at the current schema version",
                detail={"type": event.type, "schema_version": event.schema_version},
            )
        try:
            payload = model.model_validate(event.data)
            # Most events carry no metadata; skip the model for them (hot path).
            meta = Metadata.model_validate(event.metadata) if event.metadata else None
        except pydantic.ValidationError as exc:
            raise InvalidEvent(
                f"{event.type}: invalid event: {_summarise(exc)}",
                detail={"type": event.type, "errors": _errors(exc)},
            ) from exc
        data = payload.model_dump(mode="json")
        if _has_nul(data) or _has_nul(event.metadata):
            raise InvalidEvent(
                f"{event.type}: strings may not contain NUL characters",
                detail={"type": event.type},
            )
        return NewEvent(
            type=event.type,
            data=data,
            schema_version=model.schema_version,
            metadata=meta.model_dump(mode="json", exclude_none=True) if meta else {},
        )

    def upcast(
        self, event_type: str, schema_version: int, data: Mapping[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        """Bring stored data up to the current schema version of its type.

        Unknown types pass through untouched: a reader must not crash on history written
        by a newer release; projections simply ignore types they do not handle.
        """
        current = self._models[event_type].schema_version if event_type in self._models else None
        out = dict(data)
        version = schema_version
        while current is not None and version < current:
            step = self._upcasters.get((event_type, version))
            if step is None:
                raise RuntimeError(f"no upcaster for {event_type} v{version} -> v{version + 1}")
            out = step(out)
            version += 1
        return version, out


def request_hash(
    stream_id: str, expected_version: ExpectedVersion, events: Sequence[NewEvent]
) -> str:
    """Fingerprint of an append request, to tell a retry from a reused idempotency key.

    Metadata is left out on purpose: a retry carries a new trace id but is the same request.
    """
    body = {
        "stream_id": stream_id,
        "expected_version": expected_version,
        "events": [[e.type, e.schema_version, e.data] for e in events],
    }
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _has_nul(value: object) -> bool:
    """Postgres jsonb cannot store U+0000; refuse it up front as invalid input."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, Mapping):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_has_nul(v) for v in value)
    return False


def _errors(exc: pydantic.ValidationError) -> list[dict[str, Any]]:
    return [
        {"loc": ".".join(str(p) for p in err["loc"]), "msg": err["msg"], "type": err["type"]}
        for err in exc.errors(include_url=False, include_input=False)
    ]


def _summarise(exc: pydantic.ValidationError) -> str:
    parts: Iterable[str] = (f"{e['loc'] or 'data'}: {e['msg']}" for e in _errors(exc))
    return "; ".join(parts)

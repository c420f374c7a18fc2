from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ember.core.catalog import REGISTRY as PLATFORM
from ember.core.errors import InvalidEvent, UnknownEventType, ValidationFailed
from ember.core.events import (
    ANY,
    Cursor,
    EventData,
    EventRegistry,
    NewEvent,
    check_expected_version,
    check_stream_id,
    request_hash,
)
from tests.support.events import REGISTRY, tick


def test_validate_normalises_a_known_event() -> None:
    out = REGISTRY.validate(NewEvent("counter.ticked", {"n": 3}))
    assert out.data == {"n": 3, "pad": ""}
    assert out.schema_version == 1


def test_unknown_type_is_refused_with_its_code() -> None:
    with pytest.raises(UnknownEventType) as err:
        REGISTRY.validate(NewEvent("counter.exploded", {}))
    assert err.value.code == "event.unknown_type"
    assert err.value.detail == {"type": "counter.exploded"}


@pytest.mark.parametrize(
    "data",
    [{}, {"n": "three"}, {"n": 1, "extra": True}, {"n": 1, "pad": 5}],
    ids=["missing", "wrong-type", "unknown-field", "wrong-optional"],
)
def test_malformed_payloads_are_refused(data: dict[str, object]) -> None:
    with pytest.raises(InvalidEvent) as err:
        REGISTRY.validate(NewEvent("counter.ticked", data))
    assert err.value.code == "event.invalid"
    assert err.value.detail["errors"], "the error names what is wrong"


def test_unknown_metadata_field_is_refused() -> None:
    with pytest.raises(InvalidEvent):
        REGISTRY.validate(NewEvent("counter.ticked", {"n": 1}, metadata={"who": "me"}))


def test_new_events_must_use_the_current_schema_version() -> None:
    with pytest.raises(InvalidEvent, match="current version 2"):
        REGISTRY.validate(NewEvent("person.renamed", {"name": "Ada Lovelace"}, schema_version=1))


def test_upcast_brings_old_versions_forward_and_leaves_current_alone() -> None:
    assert REGISTRY.upcast("person.renamed", 1, {"name": "Ada Lovelace"}) == (
        2,
        {"first": "Ada", "last": "Lovelace"},
    )
    assert REGISTRY.upcast("person.renamed", 2, {"first": "A", "last": "L"}) == (
        2,
        {"first": "A", "last": "L"},
    )
    # History written by a newer release passes through untouched.
    assert REGISTRY.upcast("future.thing", 7, {"x": 1}) == (7, {"x": 1})


def test_missing_upcaster_is_a_programming_error() -> None:
    reg = EventRegistry()

    @reg.register
    class V3(EventData):
        event_type = "thing.changed"
        schema_version = 3

    with pytest.raises(RuntimeError, match="no upcaster"):
        reg.upcast("thing.changed", 1, {})


def test_registering_a_type_twice_or_a_bad_name_fails() -> None:
    reg = EventRegistry()

    class A(EventData):
        event_type = "a.b"

    class B(EventData):
        event_type = "a.b"

    class Bad(EventData):
        event_type = "NoDots"

    reg.register(A)
    with pytest.raises(ValueError, match="twice"):
        reg.register(B)
    with pytest.raises(ValueError, match="dotted"):
        reg.register(Bad)


def test_platform_catalog_registers_stack_events() -> None:
    assert {"stack.started", "stack.stopped"} <= PLATFORM.types


@given(st.integers(0, 2**63 - 1), st.integers(0, 2**63 - 1))
def test_cursor_round_trips_and_orders_like_its_tuple(xid: int, pos: int) -> None:
    c = Cursor(xid, pos)
    assert Cursor.parse(str(c)) == c
    assert (c < Cursor(xid, pos + 1)) and (c < Cursor(xid + 1, 0))


@pytest.mark.parametrize("text", ["", "1", "a-b", "-1-2", "1-2-3", "1 - 2", None])
def test_bad_cursors_are_validation_errors(text: object) -> None:
    with pytest.raises(ValidationFailed) as err:
        Cursor.parse(text)  # type: ignore[arg-type]
    assert err.value.detail == {"field": "cursor"}


@given(st.from_regex(r"[a-z0-9][a-z0-9._:-]{0,199}", fullmatch=True))
def test_valid_stream_ids_pass(stream_id: str) -> None:
    assert check_stream_id(stream_id) == stream_id


@pytest.mark.parametrize("bad", ["", "-x", "App-1", "a" * 201, "a b", "ä-1", 5])
def test_invalid_stream_ids_fail(bad: object) -> None:
    with pytest.raises(ValidationFailed):
        check_stream_id(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [-1, True, 1.5, "3", None])
def test_invalid_expected_versions_fail(bad: object) -> None:
    with pytest.raises(ValidationFailed):
        check_expected_version(bad)  # type: ignore[arg-type]


def test_expected_version_accepts_any_and_naturals() -> None:
    assert check_expected_version(ANY) == ANY
    assert check_expected_version(0) == 0


def test_request_hash_ignores_metadata_but_not_payload() -> None:
    a = request_hash("s-1", 0, [tick(1)])
    with_meta = NewEvent("counter.ticked", {"n": 1, "pad": ""}, metadata={"trace_id": "t"})
    assert request_hash("s-1", 0, [with_meta]) == request_hash(
        "s-1", 0, [NewEvent("counter.ticked", {"n": 1, "pad": ""})]
    )
    assert request_hash("s-1", 0, [tick(2)]) != a
    assert request_hash("s-1", 1, [tick(1)]) != a
    assert request_hash("s-2", 0, [tick(1)]) != a

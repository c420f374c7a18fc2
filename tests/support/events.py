"""Event types used only by the tests: a counter, and a type with an old schema version."""

from __future__ import annotations

from typing import Any

from ember.core.events import EventData, EventRegistry, NewEvent

REGISTRY = EventRegistry()


@REGISTRY.register
class Ticked(EventData):
    event_type = "counter.ticked"
    n: int
    pad: str = ""


@REGISTRY.register
class Renamed(EventData):
    """v1 had ``name``; v2 split it into ``first`` and ``last``."""

    event_type = "person.renamed"
    schema_version = 2
    first: str
    last: str


@REGISTRY.upcaster("person.renamed", 1)
def _renamed_v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    first, _, last = data.pop("name").partition(" ")
    return {**data, "first": first, "last": last}


def tick(n: int, pad: str = "") -> NewEvent:
    return NewEvent("counter.ticked", {"n": n, "pad": pad})

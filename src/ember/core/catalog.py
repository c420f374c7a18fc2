"""The registry of every event type the platform writes.

Each domain module defines its payload models and registers them here; the store
validates appends and upcasts reads against this one registry.
"""

from __future__ import annotations

from ember.core import enrollment, hosts, instances, ipv4, releases, routes, tenancy, workloads
from ember.core.events import EventData, EventRegistry

REGISTRY = EventRegistry()
REGISTRY.include(tenancy.REGISTRY)
REGISTRY.include(releases.REGISTRY)
REGISTRY.include(hosts.REGISTRY)
REGISTRY.include(enrollment.REGISTRY)
REGISTRY.include(instances.REGISTRY)
REGISTRY.include(workloads.REGISTRY)
REGISTRY.include(routes.REGISTRY)
REGISTRY.include(ipv4.REGISTRY)


@REGISTRY.register
class StackStarted(EventData):
    """`ember dev up` brought the single-node stack up (stream ``stack-<name>``)."""

    event_type = "stack.started"
    hostname: str
    version: str
    database: str
    """``embedded`` or ``external``."""


@REGISTRY.register
class StackStopped(EventData):
    """`ember dev down` stopped the single-node stack."""

    event_type = "stack.stopped"
    hostname: str

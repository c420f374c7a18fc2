"""Errors of the edge (HAProxy adapter and, later, the edge controller)::

    EdgeError                       edge.error
    ├── SnapshotInvalid             edge.snapshot_invalid     (ValidationFailed) a snapshot
    │                                                         the renderer refuses; nothing
    │                                                         was applied
    ├── HAProxyMissing              edge.haproxy_missing      no haproxy binary
    ├── ConfigRejected              edge.config_rejected      `haproxy -c` refused a rendered
    │                                                         config (a renderer bug); the last
    │                                                         good config keeps running
    ├── StartFailed                 edge.start_failed         haproxy exited or never answered
    ├── ListenerUnavailable         edge.listener_unavailable (kind conflict) a new listener's
    │                                                         address/port cannot be bound
    │                                                         (taken, or not on this host);
    │                                                         checked before reloading
    ├── ReloadFailed                edge.reload_failed        the master kept the old worker
    └── HAProxyUnavailable          edge.haproxy_unavailable  (Unavailable) a socket does not
                                                              answer

Every class carries a stable ``code``; third-party and OS errors are translated at the
boundary with ``raise ... from exc``. A runtime-API command HAProxy refuses is not an
error: the driver reloads instead (``ApplyResult.fallback`` says why).
"""

from __future__ import annotations

from ember.core.errors import EmberError, Kind, Unavailable, ValidationFailed

__all__ = [
    "ConfigRejected",
    "EdgeError",
    "HAProxyMissing",
    "HAProxyUnavailable",
    "ListenerUnavailable",
    "ReloadFailed",
    "SnapshotInvalid",
    "StartFailed",
]


class EdgeError(EmberError):
    code = "edge.error"
    kind = Kind.INTERNAL


class SnapshotInvalid(EdgeError, ValidationFailed):
    code = "edge.snapshot_invalid"
    kind = Kind.INVALID


class HAProxyMissing(EdgeError):
    code = "edge.haproxy_missing"
    kind = Kind.UNAVAILABLE


class ConfigRejected(EdgeError):
    code = "edge.config_rejected"


class StartFailed(EdgeError):
    code = "edge.start_failed"
    kind = Kind.UNAVAILABLE


class ListenerUnavailable(EdgeError):
    code = "edge.listener_unavailable"
    kind = Kind.CONFLICT


class ReloadFailed(EdgeError):
    code = "edge.reload_failed"


class HAProxyUnavailable(EdgeError, Unavailable):
    code = "edge.haproxy_unavailable"
    kind = Kind.UNAVAILABLE

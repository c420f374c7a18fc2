"""Edge controller: renders routes into HAProxy and keeps it in sync.

The HAProxy adapter the controller (``ember server edge``) drives:

* :mod:`ember.edge.haproxy_config` -- ``render(snapshot) -> haproxy.cfg`` and its SNI maps
  (pure); ``problems`` / ``without_invalid_routes`` for snapshots it cannot render.
* :mod:`ember.edge.plan` -- ``plan(running, new)``: runtime-API commands or a reload (pure).
* :mod:`ember.edge.runtime` -- the runtime API and master CLI sockets.
* :mod:`ember.edge.haproxy` -- :class:`~ember.edge.haproxy.HAProxy`: start (or adopt),
  ``apply(snapshot)``, ``retry_lingering()``, ``stop()``.
* :mod:`ember.edge.errors` -- the exception tree (stable codes).
"""

"""Postgres: the event log, projections, views and migrations. Imports only ember.core."""

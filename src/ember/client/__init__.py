"""Typed HTTP client of the control-plane API (used by the CLI, agent and edge)."""

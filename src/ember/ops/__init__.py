"""Operator commands (`ember admin ...`, `ember server ...`): composition roots that wire
the store, control plane and API together. The user CLI (ember.cli) never imports these."""

"""Host agent: converges desired allocations into running microVMs (issue: host agent)."""

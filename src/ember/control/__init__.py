"""Controller workers: projector runner, scheduler loop, reconcilers, change stream."""

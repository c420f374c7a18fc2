"""The single-node stack (`ember dev up`): the composition root for one machine."""

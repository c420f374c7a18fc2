"""The `ember` command: the product surface. Talks only to the control-plane API."""

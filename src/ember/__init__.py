"""Ember: a developer PaaS that runs OCI images as microVMs behind an L4 edge."""

__version__ = "0.1.0"

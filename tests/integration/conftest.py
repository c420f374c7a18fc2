"""Fixtures for the API tests live in tests.support.api."""

from tests.support.api import api, tenant

__all__ = ["api", "tenant"]

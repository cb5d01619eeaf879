"""Fixtures for the cache_builder tests (until tests/conftest.py registers the plugin)."""

from tests.fixtures.text import *  # noqa: F403

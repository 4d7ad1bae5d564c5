"""Shared fixtures: one real Redis-protocol server process per test session, on a free port."""

from __future__ import annotations

import pytest
import redis

from dpiguard.redis_server import LocalRedis


@pytest.fixture(scope="session")
def redis_server():
    server = LocalRedis().start()
    yield server
    server.close()


@pytest.fixture
def redis_url(redis_server) -> str:
    return redis_server.url


@pytest.fixture
def r(redis_server):
    """A client on a clean database (FLUSHALL before each test that uses it)."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield client
    client.close()

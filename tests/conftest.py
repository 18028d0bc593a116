"""Shared fixtures: one real redis-server for the whole session, flushed before each test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from tests.helpers import RedisProcess, start_redis


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """A real redis-server on a free loopback port (no persistence); `.url`, `.port`, `.restart()`."""
    server = start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_client(redis_server: RedisProcess) -> Iterator[redis.Redis]:
    """A client on an empty database (FLUSHALL first); restarts the server if a test stopped it."""
    if not redis_server.running:
        redis_server.start()
    client = redis.Redis.from_url(redis_server.url, decode_responses=False)
    client.flushall()
    try:
        yield client
    finally:
        client.close()

"""Shared fixtures: one real redis-server for the whole session, flushed before each test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from tinygrad.helpers import PARALLEL

from model_store import ModelStore
from tests.helpers import RedisProcess, make_store, start_redis

# tinygrad lowers this process's kernels in process instead of in its pool of spawned processes, each of which
# imports tinygrad again and is replaced every 16 kernels: on 2 cores the pool costs more than it saves (the
# per-path engine check: 32-34 s with it, 22-23 s without; the same kernels). Only this process: an API replica
# also runs tinygrad on its admin-reconcile thread, and in process the kernel cache (SQLite) refuses a second
# thread, so the processes the tests start keep the pool (PARALLEL in the environment would reach them).
PARALLEL.value = 0


def _redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """A real redis-server on a free loopback port (no persistence); `.url`, `.port`, `.restart()`."""
    yield from _redis(tmp_path_factory)


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


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    """A store with a small mlp model (tests.helpers.make_store), one per test module."""
    return make_store(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def redis_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """This module's own redis-server (no persistence), for modules whose servers outlive a test."""
    yield from _redis(tmp_path_factory)


@pytest.fixture(scope="module")
def r(redis_proc: RedisProcess) -> Iterator[redis.Redis]:
    """A client on this module's redis-server (``redis_proc``, or the module's own override of it), never
    flushed: the module's servers keep their state from test to test."""
    client = redis.Redis.from_url(redis_proc.url, decode_responses=False)
    try:
        yield client
    finally:
        client.close()

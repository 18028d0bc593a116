"""Redis clients of each process, and what "Redis is down" means to their callers.

Every client is created with ``decode_responses=False`` (logits are raw bytes) and timeouts that fit its
use; the rest of the code only ever sees these types and the :data:`REDIS_DOWN` tuple, never redis-py.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import redis
import redis.asyncio
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

SyncClient = redis.Redis
AsyncClient = redis.asyncio.Redis
#: Any failure redis-py reports (a refused script, a wrong type, ... and the outages below).
RedisError = redis.exceptions.RedisError
#: redis-py's own outage errors: no connection, or no answer in time.
CONNECTION_ERRORS: tuple[type[Exception], ...] = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
#: An outage as a caller sees it: redis-py's errors, or a caller's own ``asyncio.timeout`` running out.
REDIS_DOWN: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, TimeoutError)


def api_client(url: str, timeout_s: float) -> AsyncClient:
    """An API replica's client for requests: every call bounded by ``timeout_s``, one retry, no backoff."""
    return redis.asyncio.Redis.from_url(url, decode_responses=False, socket_timeout=timeout_s,
                                        socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 1))


def events_client(url: str, connect_timeout_s: float) -> AsyncClient:
    """An API replica's client for pub/sub: a long-lived read, so no socket timeout (keepalive and health checks)."""
    return redis.asyncio.Redis.from_url(url, decode_responses=False, socket_connect_timeout=connect_timeout_s,
                                        socket_keepalive=True, health_check_interval=30)


def blocking_client(url: str, connect_timeout_s: float, socket_timeout_s: float) -> SyncClient:
    """A blocking client for a thread that waits long on purpose (``POST /admin/reconcile``, for the worker)."""
    return redis.Redis.from_url(url, decode_responses=False, socket_connect_timeout=connect_timeout_s,
                                socket_timeout=socket_timeout_s)


def worker_client(url: str, poll_ms: int) -> SyncClient:
    """The worker's client. A half-open connection must not block a reconciler forever: reads block at most
    ``poll_ms``, so a few seconds more than that is a dead socket."""
    return redis.Redis.from_url(url, decode_responses=False, socket_timeout=poll_ms / 1000 + 5,
                                socket_connect_timeout=5, socket_keepalive=True, health_check_interval=30)


async def ping(client: AsyncClient) -> None:
    """One PING; raises one of :data:`REDIS_DOWN` when Redis does not answer."""
    await client.ping()


def wait_until_up(url: str, timeout_s: float, alive: Callable[[], bool] = lambda: True) -> bool:
    """PING ``url`` until it answers (True), or ``timeout_s`` passes or ``alive()`` turns False (False)."""
    client = redis.Redis.from_url(url, socket_timeout=1)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                if client.ping():
                    return True
            except redis.exceptions.ConnectionError:
                pass
            if not alive() or time.monotonic() > deadline:
                return False
            time.sleep(0.05)
    finally:
        client.close()

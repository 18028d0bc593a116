"""Redis clients of each process, and what "Redis is down" means to their callers.

Every client is created with ``decode_responses=False`` (logits are raw bytes) and timeouts that fit its
use; the rest of the code only ever sees these types and the :data:`REDIS_DOWN` tuple, never redis-py.

One URL names the Redis of a deployment. ``redis://`` / ``rediss://`` (and ``unix://``) is one server;
``redis+cluster://host:port,host:port`` (``rediss+cluster://`` with TLS) is a Redis Cluster given by one or
more seed nodes, served by redis-py's cluster clients. The rest of the code is the same for both: every key
of a model carries the hash tag ``{m}`` (redis_io.keys), so each script, transaction and stream read stays
in its model's slot, and classic pub/sub reaches every node of a cluster.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
import redis.exceptions
from pydantic import AfterValidator
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

log = logging.getLogger(__name__)

SyncClient = redis.Redis | redis.cluster.RedisCluster
AsyncClient = redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster
#: URL schemes of a Redis Cluster, and the scheme of one of its nodes.
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
#: Any failure redis-py reports (a refused script, a wrong type, ... and the outages below).
RedisError = redis.exceptions.RedisError
#: redis-py's own outage errors: no connection, or no answer in time.
#: A cluster adds its own: no seed reachable, a slot no node serves, a cluster that answers CLUSTERDOWN.
CONNECTION_ERRORS: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.RedisClusterUnreachableError,
    redis.exceptions.SlotNotCoveredError, redis.exceptions.ClusterDownError)
#: An outage as a caller sees it: redis-py's errors, or a caller's own ``asyncio.timeout`` running out.
REDIS_DOWN: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, TimeoutError)


@dataclass(frozen=True, slots=True)
class RedisAddress:
    """Where a deployment's Redis is: ``url`` for redis-py (a cluster's first seed, with its credentials and
    options), and for a cluster the seed nodes (none for one server)."""

    url: str
    seeds: tuple[tuple[str, int], ...] = ()

    @property
    def cluster(self) -> bool:
        return bool(self.seeds)


def parse_redis_url(url: str) -> RedisAddress:
    """Split a ``redis+cluster://[user:password@]host:port[,host:port...][/0][?options]`` URL into its seeds;
    any other URL is one server and passes through. Raises ValueError naming the fix."""
    parts = urlsplit(url)
    node_scheme = CLUSTER_SCHEMES.get(parts.scheme)
    if node_scheme is None:
        return RedisAddress(url)
    auth, _, hosts = parts.netloc.rpartition("@")
    seeds = []
    for item in hosts.split(","):
        try:  # urlsplit reads [v6]:port and checks the port's range
            seed = urlsplit("//" + item)
            host, port = seed.hostname, seed.port
        except ValueError:
            host = port = None
        if not host or port is None or port == 0:
            raise ValueError(f"a Redis Cluster seed must read host:port, not {item!r} (in {parts.scheme}:// URL)")
        seeds.append((host, port))
    if parts.path not in ("", "/", "/0") or any(k == "db" and v != "0" for k, v in parse_qsl(parts.query)):
        raise ValueError(f"a Redis Cluster has only database 0, not {parts.path.lstrip('/') or parts.query!r}: "
                         "drop the path and any db option")
    first = f"{auth}@{hosts.split(',')[0]}" if auth else hosts.split(",")[0]
    return RedisAddress(urlunsplit((node_scheme, first, "", parts.query, "")), tuple(seeds))


def _checked_url(url: str) -> str:
    parse_redis_url(url)
    return url


#: A settings field holding a Redis URL: a cluster URL's seeds are checked when the settings are read.
RedisUrl = Annotated[str, AfterValidator(_checked_url)]


def sync_client(url: str, **options: Any) -> SyncClient:
    """A blocking client of ``url`` (one server, or a cluster's client). A cluster's client reads the slot map
    when it is made, so making one raises one of :data:`CONNECTION_ERRORS` when no seed answers (and
    redis-py's RedisClusterException for what waiting cannot mend: a node not in cluster mode, say)."""
    address = parse_redis_url(url)
    if not address.cluster:
        return redis.Redis.from_url(url, decode_responses=False, **options)
    nodes = [redis.cluster.ClusterNode(host, port) for host, port in address.seeds]
    return redis.cluster.RedisCluster.from_url(address.url, startup_nodes=nodes, decode_responses=False, **options)


def async_client(url: str, **options: Any) -> AsyncClient:
    """An asyncio client of ``url`` (one server, or a cluster's client; either connects on first use)."""
    address = parse_redis_url(url)
    if not address.cluster:
        return redis.asyncio.Redis.from_url(url, decode_responses=False, **options)
    nodes = [redis.asyncio.cluster.ClusterNode(host, port) for host, port in address.seeds]
    # its connections per node are bounded (100 by default), and one more raises at once instead of waiting
    options.setdefault("max_connections", 1024)
    return redis.asyncio.cluster.RedisCluster.from_url(address.url, startup_nodes=nodes, decode_responses=False,
                                                       **options)


def api_client(url: str, timeout_s: float) -> AsyncClient:
    """An API replica's client for requests: every call bounded by ``timeout_s``, one retry, no backoff."""
    return async_client(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                        retry=Retry(NoBackoff(), 1))


def events_client(url: str, connect_timeout_s: float) -> AsyncClient:
    """An API replica's client for pub/sub: a long-lived read, so no socket timeout (keepalive and health checks;
    a cluster's client keeps its own 5 s socket timeout, which the subscription's reads stay under)."""
    return async_client(url, socket_connect_timeout=connect_timeout_s, socket_keepalive=True,
                        health_check_interval=30)


def blocking_client(url: str, connect_timeout_s: float, socket_timeout_s: float) -> SyncClient:
    """A blocking client for a thread that waits long on purpose (``POST /admin/reconcile``, for the worker)."""
    return sync_client(url, socket_connect_timeout=connect_timeout_s, socket_timeout=socket_timeout_s)


def worker_client(url: str, poll_ms: int) -> SyncClient:
    """The worker's client. A half-open connection must not block a reconciler forever: reads block at most
    ``poll_ms``, so a few seconds more than that is a dead socket (a cluster's client has no health checks)."""
    return sync_client(url, socket_timeout=poll_ms / 1000 + 5, socket_connect_timeout=5, socket_keepalive=True,
                       health_check_interval=30)


def connect_when_up(make: Callable[[], SyncClient], stop: threading.Event, retry_s: float = 1.0) -> SyncClient | None:
    """``make()`` once Redis answers (a cluster's client cannot be made before), retrying every ``retry_s``;
    None when ``stop`` is set first."""
    while not stop.is_set():
        try:
            return make()
        except CONNECTION_ERRORS as exc:
            log.warning("Redis is not reachable yet (%s); retrying in %.0f s", exc, retry_s)
            stop.wait(retry_s)
    return None


class LazyClient:
    """A blocking client made on first use, by any thread. A cluster's client reads the slot map when it is
    made, so a process that makes one at start could not start while Redis is down; this one can."""

    def __init__(self, make: Callable[[], SyncClient]) -> None:
        self._make, self._client, self._lock = make, None, threading.Lock()

    def get(self) -> SyncClient:
        with self._lock:
            if self._client is None:
                self._client = self._make()
            return self._client

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None


async def ping(client: AsyncClient) -> None:
    """One PING; raises one of :data:`REDIS_DOWN` when Redis does not answer."""
    await client.ping()


def wait_until_up(url: str, timeout_s: float, alive: Callable[[], bool] = lambda: True) -> bool:
    """PING ``url`` until it answers (True), or ``timeout_s`` passes or ``alive()`` turns False (False)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client = sync_client(url, socket_timeout=1, socket_connect_timeout=1)
            try:
                if client.ping():
                    return True
            finally:
                client.close()
        except CONNECTION_ERRORS:
            pass
        if not alive() or time.monotonic() > deadline:
            return False
        time.sleep(0.05)

"""Acknowledge dropped entries without publishing a version, only while still the leader.

The publish script acknowledges dropped entries together with the version it publishes. When nothing
can be published and the buffer is full of entries that will never be used (after a rollback, say),
waiting for a publish would stall the worker, so it acknowledges them on their own. The fencing check
is an optimistic transaction (WATCH the fence and the version, check, MULTI/XACK/EXEC): if another
leader took over, or serving moved to another version (which may change what is stale) in between,
nothing is acknowledged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import redis
from redis.exceptions import WatchError

from common.faults import fault_point
from redis_io.keys import ModelKeys
from redis_io.protocol import StaleLeaderError

log = logging.getLogger(__name__)


def fenced_ack(client: redis.Redis, keys: ModelKeys, group: str, token: int, version: int | None,
               entry_ids: Sequence[str]) -> int | None:
    """XACK ``entry_ids`` if the fence is still ``token`` and ``mp:{m}:version`` still reads ``version``.

    Returns the number acknowledged, or None when the version moved or a concurrent change aborted
    the transaction (try again later); raises StaleLeaderError when a newer token exists.
    """
    if not entry_ids:
        return 0
    with client.pipeline(transaction=True) as pipe:
        try:
            pipe.watch(keys.fence, keys.version)
            fence, current = pipe.get(keys.fence), pipe.get(keys.version)
            if int(fence or 0) != token:  # strict, like the publish script: only the current token acks
                raise StaleLeaderError(f"fencing token {token} is not the current {int(fence or 0)}")
            if (None if current is None else int(current)) != version:
                return None
            fault_point("fenced_ack_before_exec")  # a death here: the connection closes, WATCH and all
            pipe.multi()
            pipe.xack(keys.feedback, group, *entry_ids)
            (acked,) = pipe.execute()
            return int(acked)
        except WatchError:
            log.info("%s: fenced ack aborted: the fence or the version changed", keys.model)
            return None

"""The version events an API replica listens to: ``mp:{m}:events``, one message per publish or rollback.

A message only says "look again": the version key is what counts (docs/DESIGN.md §2).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from redis_io.connect import AsyncClient


class EventSubscription:
    """A subscription to some models' event channels, for one ``async with`` block (one connection)."""

    def __init__(self, client: AsyncClient, channels: Iterable[str]) -> None:
        self.client, self.channels = client, list(channels)
        self._pubsub: Any = None

    async def __aenter__(self) -> EventSubscription:
        self._pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        try:
            await self._pubsub.subscribe(*self.channels)
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._close()

    async def _close(self) -> None:
        try:
            await self._pubsub.aclose()
        except Exception:  # the connection is gone already
            pass

    async def next_message(self, timeout_s: float) -> tuple[str, Any] | None:
        """(channel, data) of the next message, or None when none came within ``timeout_s``."""
        msg = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout_s)
        if msg is None or msg.get("type") != "message":
            return None
        channel = msg["channel"].decode() if isinstance(msg["channel"], bytes) else msg["channel"]
        return channel, msg.get("data")

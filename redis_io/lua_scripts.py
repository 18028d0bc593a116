"""The Lua scripts of the Redis layer (``redis_io/lua/*.lua``), loaded from package files, registered with redis-py.

Single calls go through redis-py's ``Script`` (EVALSHA, SCRIPT LOAD + retry on NOSCRIPT).
Batches go through :func:`eval_many_async`: redis-py's own pipeline support sends a SCRIPT EXISTS round
trip before every batch; here the batch is one round trip and the script is loaded only when the
server answers NOSCRIPT (after a restart or SCRIPT FLUSH). A batch may start with plain commands
(``prelude``) that travel in the same round trip, ahead of the script calls.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from importlib import resources
from typing import Any

import redis
import redis.asyncio
from redis.commands.core import AsyncScript, Script
from redis.exceptions import NoScriptError

SCRIPT_NAMES = (
    "attach_label",
    "publish_version",
    "rollback_version",
    "acquire_lease",
    "renew_lease",
    "release_lease",
)

AnyScript = Script | AsyncScript
Call = tuple[Sequence[Any], Sequence[Any]]  # (keys, args)
Prelude = Callable[[Any], None]  # queues plain commands on a pipeline


@functools.cache
def script_source(name: str) -> str:
    """Text of ``redis_io/lua/{name}.lua`` (package data: found in a source checkout and in an installed wheel)."""
    if name not in SCRIPT_NAMES:
        raise KeyError(f"unknown script {name!r}")
    return resources.files("redis_io").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


@dataclass(frozen=True, slots=True)
class Scripts:
    """The registered scripts of one client (sync ``Script`` or async ``AsyncScript``)."""

    attach_label: AnyScript
    publish_version: AnyScript
    rollback_version: AnyScript
    acquire_lease: AnyScript
    renew_lease: AnyScript
    release_lease: AnyScript

    @classmethod
    def register(cls, client: redis.Redis | redis.asyncio.Redis) -> Scripts:
        return cls(**{f.name: client.register_script(script_source(f.name)) for f in fields(cls)})


def _queue(pipe: Any, script: AnyScript, calls: Sequence[Call], indices: Sequence[int]) -> None:
    for i in indices:
        keys, args = calls[i]
        pipe.evalsha(script.sha, len(keys), *keys, *args)


def _merge(replies: list[Any], indices: Sequence[int], new: list[Any]) -> list[int]:
    """Store ``new`` at ``indices``; return the indices that still lack the script."""
    for i, reply in zip(indices, new, strict=True):
        replies[i] = reply
    return [i for i in indices if isinstance(replies[i], NoScriptError)]


def _raise_errors(replies: list[Any]) -> list[Any]:
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


def _first_pipe(
    client: Any, script: AnyScript, calls: Sequence[Call], prelude: Prelude | None, transaction: bool
) -> tuple[Any, int]:
    """The first attempt's pipeline: prelude commands, then every script call; and the prelude's size."""
    pipe = client.pipeline(transaction=transaction)
    if prelude is not None:
        prelude(pipe)
    skip = len(pipe)
    _queue(pipe, script, calls, range(len(calls)))
    return pipe, skip


async def eval_many_async(
    client: redis.asyncio.Redis,
    script: AsyncScript,
    calls: Sequence[Call],
    prelude: Prelude | None = None,
    transaction: bool = False,
) -> list[Any]:
    """Run ``script`` once per call in one pipelined round trip; raise the first error.

    ``prelude`` queues plain commands that run first, in the same round trip (and, with
    ``transaction``, in the same MULTI/EXEC). Only the script calls are retried after NOSCRIPT, in a
    second round trip (outside any transaction); the replies returned are those of the script calls.
    (Only the replicas batch script calls: the worker's publish is one call.)
    """
    replies: list[Any] = [None] * len(calls)
    pipe, skip = _first_pipe(client, script, calls, prelude, transaction)
    raw = await pipe.execute(raise_on_error=False)
    _raise_errors(raw[:skip])
    todo = _merge(replies, range(len(calls)), raw[skip:])
    if todo:
        script.sha = await client.script_load(script.script)
        pipe = client.pipeline(transaction=False)
        _queue(pipe, script, calls, todo)
        _merge(replies, todo, await pipe.execute(raise_on_error=False))
    return _raise_errors(replies)

"""Closed-loop HTTP load on loopback, cheap on the client side.

The load generator shares the machine with the server it measures, so every CPU cycle it spends is one
the server does not get. Hence a minimal HTTP/1.1 client: one keep-alive connection per simulated
client, request bodies encoded once up front, answers parsed only when a phase needs something from
them (ids to label). Each client sends its next request as soon as the previous one is answered.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np


class HttpError(RuntimeError):
    pass


class Connection:
    """One keep-alive HTTP/1.1 connection that POSTs JSON bodies and reads Content-Length answers."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _open(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)

    async def post(self, path: str, body: bytes, content_type: str = "application/json") -> tuple[int, bytes]:
        if self._writer is None:
            await self._open()
        assert self._reader is not None and self._writer is not None
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: {content_type}\r\n"
                f"{self.extra}Content-Length: {len(body)}\r\n\r\n").encode()
        self._writer.write(head + body)
        status_line = await self._reader.readline()
        if not status_line:
            await self.close()
            raise HttpError("the server closed the connection")
        status = int(status_line.split(b" ", 2)[1])
        length, close = None, False
        while True:
            line = await self._reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        if length is None:
            raise HttpError("an answer without Content-Length")
        payload = await self._reader.readexactly(length)
        if close:
            await self.close()
        return status, payload

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except OSError:
                pass
        self._reader = self._writer = None


# (client index, request number) -> (path, body, items in the request); None: this client is done
MakeRequest = Callable[[int, int], tuple[str, bytes, int] | None]
OnAnswer = Callable[[int, bytes], None]


@dataclass
class PhaseResult:
    """What a closed-loop phase measured; `row()` gives the table figures."""

    clients: int
    elapsed_s: float
    requests: int = 0
    items: int = 0
    errors: dict[int, int] = field(default_factory=dict)
    latencies_s: list[float] = field(default_factory=list)

    def row(self, items_name: str = "inputs") -> dict[str, Any]:
        lat = np.array(self.latencies_s or [float("nan")]) * 1000
        return {"clients": self.clients, "requests": self.requests,
                "requests_per_s": self.requests / self.elapsed_s, f"{items_name}_per_s": self.items / self.elapsed_s,
                "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
                "errors": sum(self.errors.values())}


async def closed_loop(url: str, clients: int, seconds: float, make_request: MakeRequest,
                      on_answer: OnAnswer | None = None, content_type: str = "application/json",
                      client_headers: Callable[[int], dict[str, str]] | None = None) -> PhaseResult:
    """`clients` connections, each sending the next request as soon as it has the answer, for `seconds`;
    ``client_headers(c)``: headers of client c's every request (an X-Client-Id a balancer routes by).

    Only 2xx answers count as served requests; the others are tallied by status in `errors`.
    """
    stop_at = time.perf_counter() + seconds
    latencies: list[float] = []
    counts = {"requests": 0, "items": 0}
    errors: dict[int, int] = {}

    async def one(c: int) -> None:
        conn = Connection(url, client_headers(c) if client_headers else None)
        i = 0
        try:
            while time.perf_counter() < stop_at:
                req = make_request(c, i)
                if req is None:
                    return
                path, body, n = req
                i += 1
                start = time.perf_counter()
                status, payload = await conn.post(path, body, content_type)
                took = time.perf_counter() - start
                if 200 <= status < 300:
                    latencies.append(took)
                    counts["requests"] += 1
                    counts["items"] += n
                    if on_answer is not None:
                        on_answer(c, payload)
                else:
                    errors[status] = errors.get(status, 0) + 1
        finally:
            await conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(one(c) for c in range(clients)))
    return PhaseResult(clients, time.perf_counter() - start, counts["requests"], counts["items"], errors, latencies)

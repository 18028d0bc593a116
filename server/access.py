"""API keys of /predict and /label: who is calling, whether they may, and how often.

Without ``api_keys`` configured both routes stay open and records carry no client. With keys, a request
names its key in ``X-API-Key: <secret>`` (primary) or ``Authorization: Bearer <secret>``; a missing or
unknown key is a 401, a key of a ``disabled_clients`` client a 403, and a client over its token bucket
(``rate_limit_per_s``, ``rate_limit_burst``) a 429 with Retry-After. The bucket lives in this process:
with N replicas a client may send up to N times the rate in all.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from server.errors import ApiError
from server.schemas import ErrorResponse

log = logging.getLogger(__name__)

_key_header = APIKeyHeader(name="X-API-Key", scheme_name="ClientApiKey", auto_error=False,
                           description="a client API key (MPSERVE_API_KEYS); only when the server has keys")
_bearer = HTTPBearer(scheme_name="ClientBearer", auto_error=False,
                     description="the same client API key as a bearer token (X-API-Key takes precedence)")

#: The answers of a route guarded by :func:`require_client`, for its OpenAPI ``responses``.
ACCESS_ERRORS: dict[int | str, dict[str, object]] = {
    401: {"model": ErrorResponse, "description": "API keys are configured and the request has no valid one"},
    403: {"model": ErrorResponse, "description": "the client of this key is disabled"},
    429: {"model": ErrorResponse, "description": "the client's rate limit is exceeded (see Retry-After)",
          "headers": {"Retry-After": {"description": "seconds until a request is allowed again",
                                      "schema": {"type": "integer"}}}},
}


def _digest(secret: str) -> bytes:
    """Compare digests, not secrets: equal lengths, so compare_digest's time says nothing about the key."""
    return hashlib.sha256(secret.encode()).digest()


class TokenBucket:
    """Per-client token buckets: ``burst`` requests at once, refilled at ``rate`` per second."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, at); bounded by the clients

    def take(self, client: str) -> float:
        """0 when ``client`` may go now (a token is spent), else the seconds until it may."""
        now = self.clock()
        tokens, at = self._buckets.get(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        if tokens >= 1.0:
            self._buckets[client] = (tokens - 1.0, now)
            return 0.0
        self._buckets[client] = (tokens, now)
        return (1.0 - tokens) / self.rate


class ClientAccess:
    """The configured clients of one replica and their buckets."""

    def __init__(self, keys: Mapping[str, SecretStr], disabled: list[str], rate_per_s: float, burst: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._digests = [(name, _digest(secret.get_secret_value())) for name, secret in keys.items()]
        self.disabled = frozenset(disabled)
        self.bucket = TokenBucket(rate_per_s, burst, clock) if rate_per_s > 0 else None

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def identify(self, secret: str | None) -> str | None:
        """The client name of ``secret``; None when keys are off. Raises the 401/403/429 answers."""
        if not self._digests:
            return None
        challenge = {"WWW-Authenticate": "Bearer"}
        if not secret:
            raise ApiError(401, "this server needs an API key: send 'X-API-Key: <key>' "
                                "(or 'Authorization: Bearer <key>')", challenge)
        given = _digest(secret)
        client = None
        for name, digest in self._digests:  # every key is compared, whichever matches
            if hmac.compare_digest(given, digest):
                client = name
        if client is None:
            raise ApiError(401, "unknown API key", challenge)
        if client in self.disabled:
            raise ApiError(403, f"client {client!r} is disabled on this server")
        if self.bucket is not None:
            wait = self.bucket.take(client)
            if wait > 0:
                raise ApiError(429, f"client {client!r} is over its rate limit of {self.bucket.rate:g} requests/s "
                                    f"(burst {self.bucket.burst}) on this replica; retry in {wait:.2f} s",
                               {"Retry-After": str(max(1, math.ceil(wait)))})
        return client


async def require_client(request: Request,
                         key: Annotated[str | None, Depends(_key_header)],
                         bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str | None:
    """The calling client's name (None when the server has no API keys); async: buckets need no lock."""
    access: ClientAccess = request.app.state.mp.access
    return access.identify(key if key else bearer.credentials if bearer is not None else None)


#: A route parameter: the authenticated client's name, or None on a server without API keys.
ClientDep = Annotated[str | None, Depends(require_client)]

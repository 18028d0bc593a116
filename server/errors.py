"""Errors the API answers on purpose, and their JSON shape.

Every error body is ``{"detail": ...}``: a message, or for malformed input a list of
``{"loc", "msg", "type"}`` (never echoing the input, which may be megabytes). Redis trouble is a 503
with a clear message, bounded by ``redis_timeout_s``: never a 500, never a hang.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from redis_io.connect import CONNECTION_ERRORS, REDIS_DOWN

log = logging.getLogger(__name__)

MAX_ERRORS = 20


class ApiError(Exception):
    """An answer with a status and a detail, raised from anywhere below the routes."""

    def __init__(self, status: int, detail: Any, headers: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers, self.extra = status, detail, headers, extra or {}


class RedisUnavailable(ApiError):
    def __init__(self, what: str, exc: BaseException | None = None) -> None:
        reason = f": {type(exc).__name__}: {exc}" if exc is not None and str(exc) else ""
        super().__init__(503, f"Redis is unavailable ({what}){reason}; retry later", {"Retry-After": "1"})


def invalid(loc: Sequence[str | int], msg: str, kind: str = "value_error") -> ApiError:
    """A 422 shaped like FastAPI's own validation errors."""
    return ApiError(422, [{"loc": ["body", *loc], "msg": msg, "type": kind}])


def learning_off(what: str) -> ApiError:
    """A 409: this replica runs with learning off, so it records nothing and cannot take labels."""
    return ApiError(409, f"learning is off on this server (MPSERVE_LEARNING=false): {what} are not accepted; "
                         "send them to a replica with learning on")


@asynccontextmanager
async def redis_op(what: str, timeout_s: float) -> AsyncIterator[None]:
    """Bound a Redis exchange by ``timeout_s`` and turn an outage into a 503."""
    try:
        async with asyncio.timeout(timeout_s):
            yield
    except REDIS_DOWN as exc:
        log.debug("Redis unavailable during %s: %r", what, exc)
        raise RedisUnavailable(what, exc) from exc


def _clean(errors: Sequence[Any]) -> list[dict[str, Any]]:
    out = []
    for e in list(errors)[:MAX_ERRORS]:
        item = {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "invalid")), "type": e.get("type", "")}
        ctx = e.get("ctx")
        if e.get("type") == "json_invalid" and ctx and "error" in ctx:
            item["msg"] = f"invalid JSON: {ctx['error']}"
        out.append(item)
    return out


async def _validation_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return JSONResponse({"detail": _clean(exc.errors())}, status_code=422)


async def _api_error_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return JSONResponse({"detail": exc.detail, **exc.extra}, status_code=exc.status, headers=exc.headers)


def error_body(path: str, message: Any) -> dict[str, Any]:
    """An error body in the shape of the route set asked: the Open Inference Protocol's (/v2) or the native one."""
    return {"error": str(message)} if path == "/v2" or path.startswith("/v2/") else {"detail": message}


async def _http_handler(request: Request, exc: Exception) -> JSONResponse:
    """404 for an unknown path, 405 for a wrong method: in the shape of the route set the path belongs to."""
    assert isinstance(exc, StarletteHTTPException)
    return JSONResponse(error_body(request.url.path, exc.detail), status_code=exc.status_code, headers=exc.headers)


async def _redis_handler(_: Request, exc: Exception) -> JSONResponse:
    """A Redis outage that escaped a ``redis_op`` (e.g. inside a dependency) is still a 503."""
    log.warning("Redis unavailable: %r", exc)
    return await _api_error_handler(_, RedisUnavailable("request", exc))


def install_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(ApiError, _api_error_handler)
    app.add_exception_handler(StarletteHTTPException, _http_handler)
    for exc_type in CONNECTION_ERRORS:
        app.add_exception_handler(exc_type, _redis_handler)

"""Strict JSON request bodies, parsed fast: UTF-8 only, no NaN or Infinity literals, bounded nesting.

``/predict`` bodies are large arrays of numbers (8 Fashion-MNIST images are ~37 KB), and parsing them
was the largest cost on the event loop under load: pydantic-core's parser takes about half the time of
``json.loads``, with the same Python objects out, and refuses NaN and infinities when told to. Python's
``json`` accepts ``NaN``, ``Infinity`` and ``-Infinity`` (not JSON) and raises RecursionError a few
thousand levels deep; pydantic-core stops at a fixed depth. So the fast parser runs first, and only a
body it refuses goes through the standard library with those constants refused, which says precisely
what is wrong (and still accepts nesting the fast parser's depth limit alone would refuse). Errors are
``json.JSONDecodeError``, which FastAPI turns into a 422 ``json_invalid`` before anything reaches
validation, Redis or the model.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from pydantic_core import from_json


def _refuse_constant(name: str) -> Any:
    raise json.JSONDecodeError(f"{name} is not a JSON number (NaN and infinities are refused)", "", 0)


def strict_loads(body: bytes) -> Any:
    """The JSON value of ``body``, or a ``JSONDecodeError`` that says what is wrong with it."""
    try:
        text = body.decode("utf-8")  # RFC 8259: JSON exchanged between systems is UTF-8
    except UnicodeDecodeError as exc:
        raise json.JSONDecodeError(f"the body is not UTF-8 ({exc.reason} at byte {exc.start})", "", 0) from None
    try:
        return from_json(body.removeprefix(b"\xef\xbb\xbf"), allow_inf_nan=False)
    except ValueError:
        pass  # the slow path below says exactly why, or accepts what only the fast parser's limits refused
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise json.JSONDecodeError("the body is nested too deeply", "", 0) from None


class StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = strict_loads(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    """A route whose JSON body is parsed by :func:`strict_loads` (FastAPI's documented custom-route hook)."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict_handler

"""Strict JSON request bodies: UTF-8 only, no NaN or Infinity literals, bounded nesting.

Python's ``json`` accepts ``NaN``, ``Infinity`` and ``-Infinity`` (not JSON), and a body nested a few
thousand levels deep makes it raise RecursionError. Every body-taking route uses :class:`StrictJSONRoute`,
which parses with :func:`strict_loads`; its errors are ``json.JSONDecodeError``, which FastAPI turns into
a 422 ``json_invalid`` with our message, before anything reaches validation, Redis or the model.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute


def _refuse_constant(name: str) -> Any:
    raise json.JSONDecodeError(f"{name} is not a JSON number (NaN and infinities are refused)", "", 0)


def strict_loads(body: bytes) -> Any:
    """The JSON value of ``body``, or a ``JSONDecodeError`` that says what is wrong with it."""
    try:
        text = body.decode("utf-8")  # RFC 8259: JSON exchanged between systems is UTF-8
    except UnicodeDecodeError as exc:
        raise json.JSONDecodeError(f"the body is not UTF-8 ({exc.reason} at byte {exc.start})", "", 0) from None
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
    """A route whose JSON body is parsed by :func:`strict_loads`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict_handler

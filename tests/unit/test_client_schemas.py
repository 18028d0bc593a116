"""The HTTP client's response types (TypedDicts, so the client needs no pydantic) in step with the server's schemas.

Each TypedDict in `mpserve.client` that names a response of `server.schemas` must list the same fields, each of the
same type: the same nullability, the same primitive, a nested model matched by name, a `Literal` of strings read as
`str`, and any mapping as a dict (the client does not restate what a free-form block holds).
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal, get_args, get_origin, get_type_hints, is_typeddict

import pytest
from pydantic import BaseModel

import mpserve.client as client
import server.schemas as schemas

PAIRS = sorted(name for name, obj in vars(client).items()
               if is_typeddict(obj) and isinstance(getattr(schemas, name, None), type)
               and issubclass(getattr(schemas, name), BaseModel))


def shape(t: Any) -> Any:
    """A comparable description of an annotation (see the module docstring)."""
    origin = get_origin(t)
    if origin in (typing.Union, types.UnionType):
        parts = [shape(a) for a in get_args(t) if a is not type(None)]
        return ("optional" if type(None) in get_args(t) else "union", tuple(sorted(map(repr, parts))))
    if origin is Literal:
        return shape(type(get_args(t)[0]))
    if origin is list:
        return ("list", shape(get_args(t)[0]))
    if origin is dict or t is dict:
        return "dict"
    if isinstance(t, type) and (issubclass(t, BaseModel) or is_typeddict(t)):
        return ("model", t.__name__)
    return t.__name__ if isinstance(t, type) else repr(t)


def test_every_client_response_type_has_a_server_schema() -> None:
    typed = {name for name, obj in vars(client).items() if is_typeddict(obj)}
    assert typed == set(PAIRS), f"client types without a server schema of the same name: {typed - set(PAIRS)}"
    assert len(PAIRS) >= 10


@pytest.mark.parametrize("name", PAIRS)
def test_client_type_matches_the_server_schema(name: str) -> None:
    ours = {k: shape(t) for k, t in get_type_hints(getattr(client, name)).items()}
    theirs = {k: shape(f.annotation) for k, f in getattr(schemas, name).model_fields.items()}
    assert ours == theirs

"""The fast JSON body parser gives what json.loads gives, and fails the way FastAPI expects (JSONDecodeError)."""

from __future__ import annotations

import asyncio
import json

import pytest

from server.fastjson import FastJSONRequest


def parse(body: bytes) -> object:
    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": body, "more_body": False}

    request = FastJSONRequest({"type": "http", "method": "POST", "headers": []}, receive)
    return asyncio.run(request.json())


@pytest.mark.parametrize("body", [
    b'{"inputs": [[[0.0, 1.5, 255]]], "labels": [3]}', b'{"a": 1, "a": 2}', b"[1e400, -0.0, 12345678901234567890123]",
    '{"model": "caf\u00e9"}'.encode(), b"\xef\xbb\xbf[1]",
])
def test_same_objects_as_json_loads(body: bytes) -> None:
    assert parse(body) == json.loads(body)


@pytest.mark.parametrize(("body", "pos"), [(b'{"inputs": [[1, 2]', 17), (b'{"a": 1,\n "b": x}', 15), (b"", 0),
                                         (b"[" * 300 + b"]" * 300, 201)])  # nested too deep: pydantic-core's limit
def test_invalid_json_is_a_decode_error_with_its_position(body: bytes, pos: int) -> None:
    with pytest.raises(json.JSONDecodeError) as info:
        parse(body)
    assert info.value.pos == pos

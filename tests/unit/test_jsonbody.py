"""The strict JSON body parser: json.loads's objects (fast), and a JSONDecodeError that names what is wrong."""

from __future__ import annotations

import json

import pytest

from server.jsonbody import strict_loads


@pytest.mark.parametrize("body", [
    b'{"inputs": [[[0.0, 1.5, 255]]], "labels": [3]}', b'{"a": 1, "a": 2}', b"[1e400, -0.0, 12345678901234567890123]",
    '{"model": "caf\u00e9"}'.encode(), b"\xef\xbb\xbf[1]",
    b"[" * 300 + b"]" * 300,  # deeper than the fast parser goes: the standard library still takes it
])
def test_same_objects_as_json_loads(body: bytes) -> None:
    assert strict_loads(body) == json.loads(body)


@pytest.mark.parametrize(("body", "message"), [
    (b"[NaN]", "NaN is not a JSON number"), (b'{"x": -Infinity}', "-Infinity is not a JSON number"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"), (b'{"m": "\xff"}', "not UTF-8"),
    (b'{"inputs": [[1, 2]', "Expecting"), (b"", "Expecting value"),
])
def test_refusals_are_decode_errors_that_say_why(body: bytes, message: str) -> None:
    with pytest.raises(json.JSONDecodeError) as info:
        strict_loads(body)
    assert message in str(info.value)

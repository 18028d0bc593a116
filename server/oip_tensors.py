"""Decoding an Open Inference Protocol request into the model's input array, or a 4xx that says why.

A body is JSON, or with the binary tensor data extension ``<JSON header><raw bytes>`` where the header's
length is the ``Inference-Header-Content-Length`` request header and an input with
``parameters.binary_data_size`` takes its data from the next bytes of the tail (little-endian). Values
are pixel values, as ``/predict`` takes them (the model scales them itself); nothing here touches Redis
or the engine, so a refused request leaves no trace.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import ValidationError

from server.errors import ApiError
from server.jsonbody import strict_loads
from server.oip_schemas import InferRequest, RequestInput
from server.validation import FLOAT32_MAX, nested_numbers

HEADER_LENGTH = "Inference-Header-Content-Length"  # binary tensor data: the JSON's length (case-insensitive)
INPUT_NAME = "images"
#: Input datatypes read, and their little-endian layout in binary data.
INPUT_DTYPES = {"FP32": np.dtype("<f4"), "UINT8": np.dtype("u1")}


def bad(message: str) -> ApiError:
    """A 400, the status OIP servers answer for a request they cannot run."""
    return ApiError(400, message)


def split_body(body: bytes, header_length: str | None) -> tuple[Any, bytes]:
    """The JSON header's value and the binary tail after it (empty without the extension's header)."""
    if header_length is None:
        head, tail = body, b""
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise bad(f"Inference-Header-Content-Length must be an integer, not {header_length[:40]!r}") from None
        if not 0 < n <= len(body):
            raise bad(f"Inference-Header-Content-Length is {n}, but the body has {len(body)} bytes: it must be "
                      "the length of the JSON header at the start of the body")
        head, tail = body[:n], body[n:]
    try:
        return strict_loads(head), tail
    except json.JSONDecodeError as exc:
        hint = ""
        if header_length is None and b'"binary_data_size"' in body:
            hint = f" (a body with binary tensor data needs the {HEADER_LENGTH} header)"
        raise bad(f"the JSON header is not valid JSON: {exc.msg}{hint}") from None


def parse_request(value: Any) -> InferRequest:
    """The request schema, or a 400 naming the first few problems (never echoing the input)."""
    try:
        return InferRequest.model_validate(value)
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in e['loc']) or 'body'}: "
                    f"{'unknown field' if e['type'] == 'extra_forbidden' else e['msg']}"
                    for e in exc.errors(include_url=False, include_input=False)[:5]]
        raise bad("invalid inference request: " + "; ".join(problems)) from None


def input_array(request: InferRequest, tail: bytes, input_shape: Sequence[int]) -> np.ndarray:
    """The request's images as ``(n, *input_shape)`` float32 of finite values (n >= 1 was checked by shape)."""
    (inp,) = request.inputs  # the schema allows exactly one
    binary_size = inp.parameters.binary_data_size if inp.parameters is not None else None
    shape = check_shape(inp, input_shape)
    dtype = INPUT_DTYPES[inp.datatype]
    count = math.prod(shape)
    if binary_size is not None:
        arr = _binary(inp, binary_size, tail, count, dtype)
    else:
        if tail:
            raise bad(f"{len(tail)} bytes follow the JSON header, but no input has parameters.binary_data_size")
        arr = _json(inp, shape, count)
    if inp.datatype == "FP32":
        if not np.isfinite(arr).all():
            raise bad(f"input {inp.name!r} has NaN or infinite values")
        if arr.size and np.abs(arr).max() > FLOAT32_MAX:
            raise bad(f"input {inp.name!r} has values outside the float32 range")
    return arr.reshape(shape).astype(np.float32)


def check_shape(inp: RequestInput, input_shape: Sequence[int]) -> list[int]:
    """The declared shape, checked against the model before any data is read: [N >= 1, *input_shape]."""
    if inp.name != INPUT_NAME:
        raise bad(f"unknown input {inp.name!r}: the model has one input, {INPUT_NAME!r}")
    if inp.datatype not in INPUT_DTYPES:
        raise bad(f"input {inp.name!r} has datatype {inp.datatype}; accepted: {', '.join(INPUT_DTYPES)}")
    want = [int(d) for d in input_shape]
    if len(inp.shape) != len(want) + 1 or inp.shape[1:] != want or inp.shape[0] < 1:
        raise bad(f"input {inp.name!r} has shape {inp.shape}; the model takes [N, {', '.join(map(str, want))}] "
                  "with N >= 1")
    return list(inp.shape)


def _binary(inp: RequestInput, size: int, tail: bytes, count: int, dtype: np.dtype[Any]) -> np.ndarray:
    if inp.data is not None:
        raise bad(f"input {inp.name!r} has both data and parameters.binary_data_size: give one")
    if not tail:
        raise bad(f"input {inp.name!r} has parameters.binary_data_size but the request carries no binary data "
                  "(send the Inference-Header-Content-Length header and the bytes after the JSON header)")
    need = count * dtype.itemsize
    if size != need:
        raise bad(f"input {inp.name!r} declares {size} bytes of binary data; shape {inp.shape} of "
                  f"{inp.datatype} is {need} bytes")
    if len(tail) != size:
        raise bad(f"{len(tail)} bytes follow the JSON header; the inputs declare {size}")
    return np.frombuffer(tail, dtype=dtype).astype(np.float64)


def _json(inp: RequestInput, shape: list[int], count: int) -> np.ndarray:
    """JSON data, flat (row-major) or nested exactly as the shape."""
    if inp.data is None:
        raise bad(f"input {inp.name!r} has no data (give data, or binary data with parameters.binary_data_size)")
    depth, probe = 1, inp.data
    while probe and isinstance(probe[0], list) and depth <= len(shape):
        depth, probe = depth + 1, probe[0]
    if depth > len(shape):
        raise bad(f"input {inp.name!r} has data nested deeper than its shape {shape}")
    try:
        values = nested_numbers(depth).validate_python(inp.data)
    except ValidationError as exc:
        e = exc.errors(include_url=False, include_input=False)[0]
        where = "".join(f"[{p}]" for p in e["loc"])
        raise bad(f"input {inp.name!r}: data{where}: {e['msg']} (data hold finite numbers only, flat or nested "
                  "as the shape)") from None
    try:
        arr = np.asarray(values, dtype=np.float64)
    except ValueError:
        raise bad(f"input {inp.name!r} has ragged data: nested lists must match the shape {shape}") from None
    if depth == 1 and arr.size != count:
        raise bad(f"input {inp.name!r} has {arr.size} values; shape {shape} needs {count}")
    if depth > 1 and list(arr.shape) != shape:
        raise bad(f"input {inp.name!r} has nested data of shape {list(arr.shape)}; the declared shape is {shape} "
                  "(data are flat, or nested exactly as the shape)")
    if inp.datatype == "UINT8" and arr.size and ((arr != np.floor(arr)).any() or arr.min() < 0 or arr.max() > 255):
        raise bad(f"input {inp.name!r} is UINT8: its values must be integers in [0, 255]")
    return arr

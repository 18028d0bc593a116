"""Binary inputs on the native route: ``POST /predict`` with a ``.npy`` body (``Content-Type: application/x-npy``).

A JSON body spells every pixel as decimal text, and parsing and validating those lists was most of what the API
spends per input beside the engine. A ``.npy`` body is the array's bytes behind a short header (NumPy's own
format, written by ``np.save``), so decoding it is a copy. The header is read with ``allow_pickle=False``: an
object array is refused, never unpickled. Nothing here touches Redis or the engine, so a refused body leaves
no trace; the checks (shape, finite float32 values) are those of a JSON body, and so is the answer.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from starlette.routing import Match
from starlette.types import Scope

from server.errors import ApiError, invalid
from server.validation import FLOAT32_MAX

NPY_TYPE = "application/x-npy"
#: array dtypes a body may hold (any byte order); values are pixel values, as in a JSON body
NPY_KINDS = {"f": "floating point", "u": "unsigned integer", "i": "signed integer"}


def is_npy(scope: Scope) -> bool:
    """Whether a request's content type is ``application/x-npy`` (parameters such as charset ignored)."""
    for name, value in scope.get("headers", ()):
        if name == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == NPY_TYPE.encode()
    return False


def matches_npy(match: Match, scope: Scope) -> Match:
    """A route's match narrowed to ``.npy`` bodies: a full match only when the body is one (else none)."""
    return match if match != Match.FULL or is_npy(scope) else Match.NONE


def npy_inputs(body: bytes, input_shape: Sequence[int]) -> np.ndarray:
    """(n, *input_shape) float32 of finite values from a ``.npy`` body, or a 4xx that says what is wrong."""
    shape = tuple(int(d) for d in input_shape)
    if not body.startswith(b"\x93NUMPY"):
        raise ApiError(400, "the body is not a .npy array (it must start with NumPy's magic string \\x93NUMPY); "
                            "write it with numpy.save, or send JSON with Content-Type: application/json")
    try:
        arr = np.lib.format.read_array(io.BytesIO(body), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 — whatever NumPy raises on these bytes (ValueError, EOFError,
        # tokenize's TokenError from a mangled header dict...), the bytes are the client's mistake: a 400
        raise ApiError(400, f"the .npy body cannot be read: {str(exc)[:200]}") from None
    if arr.dtype.kind not in NPY_KINDS or arr.dtype.fields is not None:
        raise invalid(["inputs"], f"the .npy array has dtype {arr.dtype}; inputs are numbers "
                                  f"({', '.join(NPY_KINDS.values())})")
    if arr.ndim != len(shape) + 1 or arr.shape[1:] != shape or arr.shape[0] < 1:
        raise invalid(["inputs"], f"the .npy array has shape {arr.shape}; the model takes (n, "
                                  f"{', '.join(map(str, shape))}) with n >= 1")
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr).reshape(len(arr), -1).all(axis=1)
        if bad.any():
            index = int(np.flatnonzero(bad)[0])
            raise invalid(["inputs", index], f"inputs[{index}] has NaN or infinite values")
    if arr.dtype.kind == "f" and arr.dtype.itemsize > 4:  # only wider floats can leave float32's range (ints can't)
        outside = (np.abs(arr) > FLOAT32_MAX).reshape(len(arr), -1).any(axis=1)
        if outside.any():
            index = int(np.flatnonzero(outside)[0])
            raise invalid(["inputs", index], f"inputs[{index}] has values outside the float32 range (|x| > 3.4e38)")
    return np.ascontiguousarray(arr, dtype=np.float32)


def query_labels(value: str | None) -> list[int] | None:
    """The ``labels`` query parameter (comma-separated class indices) as a list, or a 422."""
    if value is None:
        return None
    out = []
    for i, item in enumerate(value.split(",")):
        item = item.strip()
        if not (item.isascii() and item.isdigit() and len(item) <= 9):
            raise ApiError(422, [{"loc": ["query", "labels", i], "type": "value_error",
                                  "msg": f"labels[{i}] is {item[:20]!r}: labels are class indices (integers >= 0), "
                                         "comma-separated, one per input"}])
        out.append(int(item))
    return out

"""Checks a request against the model it names, before anything reaches Redis or the engine.

Inputs are validated strictly and quickly: a pydantic-core adapter per nesting depth (numbers only:
no strings, booleans or nulls; no NaN or infinity), then the exact shape level by level (so a ragged
or wrongly nested input is named precisely), then the float32 range (1e39 is finite in JSON but not on
the device).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Annotated, Any

import numpy as np
from pydantic import Field, TypeAdapter, ValidationError

from server.errors import MAX_ERRORS, ApiError, invalid

FiniteNumber = Annotated[float, Field(strict=True, allow_inf_nan=False)]
FLOAT32_MAX = float(np.finfo(np.float32).max)


@functools.cache
def nested_numbers(depth: int) -> TypeAdapter[Any]:
    """Validator of strict finite numbers nested ``depth`` lists deep, e.g. list[list[list[list[float]]]] (no
    strings, booleans or nulls); shared by the native inputs and the Open Inference Protocol's JSON tensors."""
    t: Any = FiniteNumber
    for _ in range(depth):
        t = list[t]
    return TypeAdapter(t)


def inputs_array(inputs: list[Any], input_shape: Sequence[int]) -> np.ndarray:
    """(n, *input_shape) float32 of finite values, or a 422 that says exactly what is wrong."""
    shape = tuple(int(d) for d in input_shape)
    try:
        data = nested_numbers(len(shape) + 1).validate_python(inputs)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
        raise ApiError(422, [{"loc": ["body", "inputs", *e["loc"]], "msg": _msg(e, shape), "type": e["type"]}
                             for e in errors[:MAX_ERRORS]]) from None
    if shape:  # scalar inputs have no lists to check
        for i, x in enumerate(data):
            _check_input(x, shape, i)
    arr = np.asarray(data, dtype=np.float64)
    if arr.size and np.abs(arr).max() > FLOAT32_MAX:
        index = int(np.flatnonzero((np.abs(arr) > FLOAT32_MAX).reshape(len(arr), -1).any(axis=1))[0])
        raise invalid(["inputs", index], f"inputs[{index}] has values outside the float32 range (|x| > 3.4e38)")
    return arr.astype(np.float32)


def _check_input(x: list[Any], shape: tuple[int, ...], index: int) -> None:
    def walk(data: list[Any], level: int, loc: list[int]) -> None:
        if len(data) != shape[level]:
            where = "".join(f"[{i}]" for i in loc)
            raise invalid(["inputs", *loc], f"inputs{where} has {len(data)} items where the input shape "
                                            f"{shape} needs {shape[level]}")
        if level + 1 < len(shape):
            for i, sub in enumerate(data):
                walk(sub, level + 1, [*loc, i])

    walk(x, 0, [index])


def _msg(error: Any, shape: tuple[int, ...]) -> str:
    if error["type"] == "list_type":
        return f"{error['msg']}: each input is nested lists of numbers of shape {shape}"
    if error["type"] == "float_type":
        return f"{error['msg']} (inputs hold numbers only, nested exactly as the shape {shape})"
    return str(error["msg"])


def labels_array(labels: list[int] | None, n: int, num_classes: int) -> np.ndarray | None:
    """(n,) int64 labels in [0, num_classes), or a 422."""
    if labels is None:
        return None
    if len(labels) != n:
        raise invalid(["labels"], f"got {len(labels)} labels for {n} inputs: give one label per input")
    for i, y in enumerate(labels):
        if not 0 <= y < num_classes:
            raise invalid(["labels", i], f"label {y} is outside the model's classes [0, {num_classes})")
    return np.asarray(labels, dtype=np.int64)

"""The one table of malformed requests: each is a clear 4xx that touches nothing.

Two tests go through it against a live replica: tests/processes/test_server.py (/predict and /label: the status,
a well-formed error, Redis and the engine untouched) and tests/processes/test_hardening.py (every route: the
status, ``message`` in the error's detail, no ``mp:*`` key and no feedback entry written). Each case says which
of them sends it (``used_by``); a case both send is written once. The limits are the replica's own
(``--max-inputs-per-request``, ``--max-body-bytes``), so the table is built for them.

The Open Inference Protocol's routes (/v2) have a table of their own, :func:`bad_oip_requests`, sent by
tests/processes/test_oip.py: their errors are ``{"error": ...}``, not ``{"detail": ...}``, and binary bodies
carry a header. Its bodies are built by hand from the protocol (KServe v2 REST, binary tensor data extension).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

SHAPE, CLASSES = (1, 28, 28), 10
RID = "a" * 32  # a well-formed prediction id that no prediction has
SERVER, HARDENING = "server", "hardening"


@dataclass(frozen=True)
class BadRequest:
    method: str
    path: str
    body: str | bytes
    status: int
    message: str | None  # a part of the error's detail (checked by test_hardening; None where it does not send it)
    used_by: frozenset[str]


def predict_body(inputs: Any, **extra: Any) -> str:
    return json.dumps({"inputs": inputs, **extra})


def zeros(n: int = 1) -> list[Any]:
    return np.zeros((n, *SHAPE), dtype=int).tolist()


def images(n: int, seed: int = 0) -> list[Any]:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *SHAPE)).tolist()


def with_value(value: Any, where: tuple[int, ...] = (0, 0, 5, 5)) -> list[Any]:
    """One input of zeros with one pixel set to ``value`` (anything JSON can write, NaN and Infinity included)."""
    x = zeros()
    i, c, h, w = where
    x[i][c][h][w] = value
    return x


def with_literal(literal: str) -> str:
    """A well-shaped /predict body with its first pixel spelled ``literal`` (NaN, Infinity: not JSON)."""
    return predict_body(zeros()).replace("0", literal, 1)


def nested(depth: int, field: str = "inputs") -> str:
    return '{"' + field + '": ' + "[" * depth + "]" * depth + "}"


def ragged(row: int, cut: int) -> list[Any]:
    x = zeros()
    x[0][0][row] = x[0][0][row][:-cut]
    return x


def bad_requests(max_inputs: int, max_body: int) -> dict[str, BadRequest]:
    """Every case, by name ("<route>: <what is wrong>"), for a replica with these limits."""
    S, H, B = frozenset({SERVER}), frozenset({HARDENING}), frozenset({SERVER, HARDENING})
    predict: list[tuple[str, str | bytes, int, str | None, frozenset[str]]] = [  # (case, body, status, message, by)
        ("NaN literal", with_literal("NaN"), 422, "NaN is not a JSON number", H),
        ("Infinity literal", with_literal("Infinity"), 422, "Infinity is not a JSON number", H),
        ("-Infinity literal", with_literal("-Infinity"), 422, "Infinity is not a JSON", H),
        ("1e400 (infinite once parsed)", with_literal("1e400"), 422, "finite number", B),
        ("beyond float32", with_literal("1e39"), 422, "float32 range", H),
        ("NaN label", predict_body(images(1))[:-1] + ', "labels": [NaN]}', 422, "NaN is not a JSON number", H),
        ("nested 10,000 deep", nested(10_000), 422, "nested too deeply", H),
        ("nested 200 deep", nested(200), 422, "valid number", H),
        ("ragged input", predict_body(ragged(3, 2)), 422, "items where the input shape", H),
        ("missing channel dim", predict_body(np.zeros((1, 28, 28)).tolist()), 422, "shape", B),
        ("too many inputs", predict_body(zeros(max_inputs + 1)), 413, f"the limit is {max_inputs}", B),
        ("body over max_body_bytes", predict_body(images(1)) + " " * max_body, 413, "larger than the limit", H),
        ("not UTF-8", b'{"inputs": [[1]], "model": "\xff\xfe"}', 422, "not UTF-8", H),
        ("model as a relative path", predict_body(images(1), model="../etc"), 422, "should match pattern", H),
        ("model as an absolute path", predict_body(images(1), model="/etc/passwd"), 422, "should match pattern", H),
        ("unknown model", predict_body(zeros(1), model="digits"), 404, "unknown model 'digits'", B),
        ("wrong shape (28x27)", predict_body(np.zeros((1, 1, 28, 27)).tolist()), 422, None, S),
        ("extra dim", predict_body(np.zeros((1, 1, 1, 28, 28)).tolist()), 422, None, S),
        ("NaN", predict_body(with_value(float("nan"))), 422, None, S),
        ("Infinity", predict_body(with_value(float("inf"))), 422, None, S),
        ("-Infinity", predict_body(with_value(float("-inf"))), 422, None, S),
        ("beyond float32 (1e+39)", predict_body(with_value(1e39)), 422, None, S),
        ("ragged", predict_body(ragged(7, 1)), 422, None, S),
        ("nested deeper than the shape", predict_body(with_value([[1.0]])), 422, None, S),
        ("very deep nesting", nested(100_000), 422, None, S),
        ("string pixel", predict_body(with_value("7")), 422, None, S),
        ("bool pixel", predict_body(with_value(True)), 422, None, S),
        ("null pixel", predict_body(with_value(None)), 422, None, S),
        ("inputs not a list", predict_body("abc"), 422, None, S),
        ("no inputs", predict_body([]), 422, None, S),
        ("missing inputs", json.dumps({"labels": [1]}), 422, None, S),
        ("labels shorter than inputs", predict_body(zeros(2), labels=[1]), 422, None, S),
        ("label out of range", predict_body(zeros(1), labels=[CLASSES]), 422, None, S),
        ("negative label", predict_body(zeros(1), labels=[-1]), 422, None, S),
        ("bool label", predict_body(zeros(1), labels=[True]), 422, None, S),
        ("float label", predict_body(zeros(1), labels=[1.5]), 422, None, S),
        ("unknown field", predict_body(zeros(1), label=[1]), 422, None, S),
        ("bad model name", predict_body(zeros(1), model="../etc"), 422, None, S),
        ("invalid JSON", '{"inputs": [[1, 2]', 422, None, S),
        ("not an object", "[1, 2, 3]", 422, None, S),
        ("oversized body", predict_body(zeros(1)) + " " * max_body, 413, None, S),
    ]
    too_many = json.dumps({"labels": [{"id": f"x{i}", "label": 1} for i in range(max_inputs + 1)]})
    label: list[tuple[str, str | bytes, int, str | None, frozenset[str]]] = [
        ("NaN label", f'{{"id": "{RID}", "label": NaN}}', 422, "NaN is not a JSON number", H),
        ("Infinity label", f'{{"id": "{RID}", "label": Infinity}}', 422, "not a JSON number", H),
        ("id as a path", json.dumps({"id": "../../etc/passwd", "label": 1}), 422, "should match pattern", H),
        ("nested 10,000 deep", nested(10_000, "labels"), 422, "nested too deeply", H),
        ("too many labels", too_many, 413, f"the limit is {max_inputs}", B),
        ("unknown id", json.dumps({"id": RID, "label": 1}), 404, "no prediction", H),
        ("missing label", json.dumps({"id": RID}), 422, None, S),
        ("bad id characters", json.dumps({"id": "a b", "label": 1}), 422, None, S),
        ("id too long", json.dumps({"id": "a" * 65, "label": 1}), 422, None, S),
        ("bool label", json.dumps({"id": RID, "label": False}), 422, None, S),
        ("string label", json.dumps({"id": RID, "label": "1"}), 422, None, S),
        ("both forms", json.dumps({"id": RID, "label": 1, "labels": [{"id": "b", "label": 1}]}), 422, None, S),
        ("empty batch", json.dumps({"labels": []}), 422, None, S),
        ("unknown model", json.dumps({"id": RID, "label": 1, "model": "digits"}), 404, None, S),
    ]
    other: list[tuple[str, str, str, str | bytes, int, str]] = [  # (case, method, path, body, status, message)
        ("rollback: version past the store's range", "POST", "/admin/rollback", '{"version": 100000000}', 422,
         "less than 100000000"),
        ("rollback: huge version", "POST", "/admin/rollback", '{"version": 123456789012345678901234567890}', 422,
         "less than"),
        ("rollback: NaN version", "POST", "/admin/rollback", '{"version": NaN}', 422, "NaN is not a JSON number"),
        ("rollback: model as a path", "POST", "/admin/rollback", '{"version": 0, "model": "../../x"}', 422,
         "should match pattern"),
        ("reconcile: nested 10,000 deep", "POST", "/admin/reconcile", nested(10_000, "model"), 422,
         "nested too deeply"),
        ("models: invalid name", "GET", "/models/Not_Valid", b"", 422, "should match pattern"),
    ]
    table = {f"{route}: {case}": BadRequest("POST", f"/{route}", body, status, message, by)
             for route, rows in (("predict", predict), ("label", label))
             for case, body, status, message, by in rows}
    table.update({case: BadRequest(method, path, body, status, message, H)
                  for case, method, path, body, status, message in other})
    return table


def sent_by(test: str, table: dict[str, BadRequest], path: str | None = None) -> dict[str, BadRequest]:
    """The cases ``test`` sends (on ``path`` only, when given), in the table's order."""
    return {name: case for name, case in table.items()
            if test in case.used_by and (path is None or case.path == path)}


# ---------------------------------------------------------------------------------- Open Inference Protocol (/v2)
OIP_HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass(frozen=True)
class BadOipRequest:
    body: bytes
    headers: dict[str, str]
    status: int


def oip_tensor(x: np.ndarray, datatype: str = "FP32", nested: bool = False) -> dict[str, Any]:
    """An input tensor of images ``x`` ([N, 1, 28, 28]) with JSON data, flat (row-major) or nested."""
    values = x.astype(np.uint8) if datatype == "UINT8" else x
    return {"name": "images", "shape": list(x.shape), "datatype": datatype,
            "data": values.tolist() if nested else values.ravel().tolist()}


def _oip_one(x: np.ndarray, **changes: Any) -> bytes:
    """A one-image JSON request with ``changes`` made to its input tensor."""
    return json.dumps({"inputs": [{**oip_tensor(x), **changes}]}).encode()


def _oip_binary(x: np.ndarray, size: int | None = None, tail: bytes | None = None, header: str | None = None,
                **input_changes: Any) -> tuple[bytes, dict[str, str]]:
    """A binary request: the JSON header, then ``tail`` (default: ``x`` as little-endian FP32)."""
    raw = x.astype("<f4").tobytes() if tail is None else tail
    inp = {"name": "images", "shape": list(x.shape), "datatype": "FP32",
           "parameters": {"binary_data_size": len(raw) if size is None else size}, **input_changes}
    head = json.dumps({"inputs": [inp]}).encode()
    return head + raw, {OIP_HEADER_LENGTH: str(len(head)) if header is None else header}


def bad_oip_requests(max_inputs: int, max_body: int) -> dict[str, BadOipRequest]:
    """Every malformed ``POST /v2/models/{m}/infer``, by name, for a replica with these limits: 400 or 413."""
    rng = np.random.default_rng(6)
    one = rng.integers(0, 256, size=(1, *SHAPE)).astype(np.float32)
    many = rng.integers(0, 256, size=(max_inputs + 1, *SHAPE)).astype(np.float32)
    nan = one.copy()
    nan[0, 0, 3, 4] = np.nan
    flat = one.ravel().tolist()
    pixels = one.size
    raw = one.astype("<f4").tobytes()
    half = [0.5, *flat[1:]]

    def literal(spelled: str) -> bytes:
        body = _oip_one(one, data=half)
        assert b'"data": [0.5,' in body
        return body.replace(b'"data": [0.5,', b'"data": [' + spelled.encode() + b",")

    def request(**fields: Any) -> bytes:
        return json.dumps({"inputs": [oip_tensor(one)], **fields}).encode()

    rows: dict[str, tuple[bytes, dict[str, str], int]] = {
        "not JSON": (b'{"inputs": [', {}, 400),
        "not UTF-8": (b'{"inputs": [], "id": "\xff\xfe"}', {}, 400),
        "NaN literal": (literal("NaN"), {}, 400),
        "-Infinity literal": (literal("-Infinity"), {}, 400),
        "nested 10,000 deep": (b'{"inputs": [{"data": ' + b"[" * 10_000 + b"]" * 10_000 + b"}]}", {}, 400),
        "data nested 200 deep": (_oip_one(one, data=json.loads("[" * 200 + "]" * 200)), {}, 400),
        "not the schema": (b'{"input": []}', {}, 400),
        "not an object": (b"[1, 2, 3]", {}, 400),
        "no inputs": (b'{"inputs": []}', {}, 400),
        "two inputs": (json.dumps({"inputs": [oip_tensor(one), oip_tensor(one)]}).encode(), {}, 400),
        "unknown field": (request(model="fashion"), {}, 400),
        "unknown input name": (_oip_one(one, name="pixels"), {}, 400),
        "unknown datatype": (_oip_one(one, datatype="FP33"), {}, 400),
        "datatype not taken": (_oip_one(one, datatype="INT64"), {}, 400),
        "shape of one image": (_oip_one(one, shape=list(SHAPE)), {}, 400),
        "wrong image shape": (_oip_one(one, shape=[1, 1, 28, 27]), {}, 400),
        "zero images": (_oip_one(one, shape=[0, *SHAPE], data=[]), {}, 400),
        "data shorter than the shape": (_oip_one(one, data=flat[:-1]), {}, 400),
        "data longer than the shape": (_oip_one(one, data=[*flat, 0.0]), {}, 400),
        "no data": (_oip_one(one, data=None), {}, 400),
        "ragged nested data": (_oip_one(one, data=[[one[0, 0].tolist()[:-1]]]), {}, 400),
        "nested as another shape": (_oip_one(one, data=one.reshape(1, 28, 1, 28).tolist()), {}, 400),
        "a string value": (_oip_one(one, data=["1", *flat[1:]]), {}, 400),
        "a boolean value": (_oip_one(one, data=[True, *flat[1:]]), {}, 400),
        "a null value": (_oip_one(one, data=[None, *flat[1:]]), {}, 400),
        "outside float32": (_oip_one(one, data=[1e39, *flat[1:]]), {}, 400),
        "UINT8 over 255": (_oip_one(one, datatype="UINT8", data=[256, *flat[1:]]), {}, 400),
        "UINT8 not an integer": (_oip_one(one, datatype="UINT8", data=[1.5, *flat[1:]]), {}, 400),
        "unknown output": (request(outputs=[{"name": "logits"}]), {}, 400),
        "binary_data_output not a boolean": (request(parameters={"binary_data_output": "yes"}), {}, 400),
        "binary_data not a boolean": (request(outputs=[{"name": "label", "parameters": {"binary_data": "yes"}}]),
                                      {}, 400),
        "binary: NaN": (*_oip_binary(nan), 400),
        "binary: size not the shape's": (*_oip_binary(one, size=pixels * 4 - 4, tail=raw[:-4]), 400),
        "binary: fewer bytes than declared": (*_oip_binary(one, size=pixels * 4, tail=raw[:-1]), 400),
        "binary: more bytes than declared": (*_oip_binary(one, size=pixels * 4, tail=raw + b"\0"), 400),
        "binary: header length past the body": (*_oip_binary(one, header=str(10**6)), 400),
        "binary: header length not a number": (*_oip_binary(one, header="12x"), 400),
        "binary: header length cuts the JSON": (*_oip_binary(one, header="10"), 400),
        "binary: no header length": (_oip_binary(one)[0], {}, 400),
        "binary: size but no bytes": (*_oip_binary(one, tail=b"", size=pixels * 4), 400),
        "binary: both data and size": (*_oip_binary(one, data=flat), 400),
        "binary: bytes but no size": (_oip_one(one) + raw, {OIP_HEADER_LENGTH: str(len(_oip_one(one)))}, 400),
        "more images than allowed": (*_oip_binary(many), 413),
        "body over max_body_bytes": (*_oip_binary(one, size=max_body, tail=b"\0" * max_body), 413),
    }
    return {name: BadOipRequest(body, headers, status) for name, (body, headers, status) in rows.items()}

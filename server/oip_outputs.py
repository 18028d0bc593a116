"""The outputs of an Open Inference Protocol answer: which ones, and as JSON or binary tensor data.

Outputs are ``probabilities`` FP32 [N, classes], ``label`` INT64 [N] and ``id`` BYTES [N] (the record ids
``POST /label`` takes; none on a replica with learning off). With the binary tensor data extension
(``parameters.binary_data_output`` on the request, or ``binary_data`` on an output) an output's values
leave the JSON and follow it as raw little-endian bytes, BYTES elements each after a 4-byte length, and
the answer's ``Inference-Header-Content-Length`` header gives the JSON's length.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.inference import Inference
from server.oip_schemas import InferRequest
from server.oip_tensors import bad

OUTPUTS = ("probabilities", "label", "id")


@dataclass(frozen=True)
class Wanted:
    name: str
    binary: bool


def wanted(request: InferRequest, learning: bool) -> list[Wanted]:
    """The outputs to return, in the order asked (default: all); a 400 for one the model has not."""
    available = [o for o in OUTPUTS if learning or o != "id"]
    default = (request.parameters or {}).get("binary_data_output", False)
    if not isinstance(default, bool):
        raise bad("parameters.binary_data_output must be true or false")
    if request.outputs is None:
        return [Wanted(name, default) for name in available]
    out = []
    for o in request.outputs:
        if o.name not in available:
            raise bad(f"unknown output {o.name!r}: the model's outputs are {available}")
        binary = o.parameters.binary_data if o.parameters is not None else None
        out.append(Wanted(o.name, default if binary is None else binary))
    return out


def _tensor(result: Inference, name: str) -> tuple[str, list[int], Any]:
    """(datatype, shape, values): a NumPy array, or for BYTES a list of strings."""
    n, classes = result.probabilities.shape
    if name == "probabilities":
        return "FP32", [n, classes], result.probabilities.astype("<f4")
    if name == "label":
        return "INT64", [n], result.labels.astype("<i8")
    return "BYTES", [n], [rid or "" for rid in result.ids]


def _raw(datatype: str, values: Any) -> bytes:
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(b)) + b for b in (v.encode() for v in values))
    return bytes(np.ascontiguousarray(values).tobytes())


def encode(head: dict[str, Any], result: Inference, outputs: list[Wanted]) -> tuple[bytes, int | None]:
    """The answer's body, and its JSON's length when binary data follow it (None: the body is all JSON)."""
    tensors, tail = [], []
    for w in outputs:
        datatype, shape, values = _tensor(result, w.name)
        tensor: dict[str, Any] = {"name": w.name, "shape": shape, "datatype": datatype}
        if w.binary:
            raw = _raw(datatype, values)
            tensor["parameters"] = {"binary_data_size": len(raw)}
            tail.append(raw)
        else:
            tensor["data"] = values if isinstance(values, list) else values.ravel().tolist()
        tensors.append(tensor)
    body = json.dumps({**head, "outputs": tensors}, separators=(",", ":")).encode()
    if not tail:
        return body, None
    return body + b"".join(tail), len(body)

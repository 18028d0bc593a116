"""Safetensors in and out of NumPy, through the `safetensors` package (no pickle, no torch).

The reference implementation parses the header (length limit, JSON, dtypes, shapes, offsets that must
tile the buffer exactly, arithmetic overflow) in Rust and is fuzzed upstream, so this module does not
parse a header of its own. It adds what a model store needs around it:

- the writer refuses, with a message that names the tensor, what safetensors cannot hold (complex or
  object arrays, the reserved ``__metadata__`` name, metadata that is not str to str), and lays out
  contiguous little-endian copies, since the library reads raw memory;
- the reader turns every refusal into `SafetensorsError` (a `ValueError`), refuses dtypes NumPy has no
  type for (BF16, F8: reinterpreting their bits would be worse than refusing), refuses BOOL tensors whose
  bytes are not 0 or 1, and returns owned, writable, native-order copies (the library's arrays are views
  of the input bytes).

The store checks a file's sha256 against its manifest before anything here reads it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, BinaryIO

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as _load
from safetensors.numpy import save as _save

from .errors import SafetensorsError

__all__ = ["DTYPES", "SafetensorsError", "encode_safetensors", "load_safetensors", "save_safetensors"]

METADATA_KEY = "__metadata__"

#: safetensors dtype name -> little-endian NumPy dtype: what the store reads and writes.
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "U8": np.dtype("u1"),
    "I8": np.dtype("i1"),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
}
_LE_OF_KIND: dict[tuple[str, int], np.dtype] = {(dt.kind, dt.itemsize): dt for dt in DTYPES.values()}


def _little_endian(arr: np.ndarray, name: str) -> np.ndarray:
    dtype = _LE_OF_KIND.get((arr.dtype.kind, arr.dtype.itemsize))
    if dtype is None:
        raise SafetensorsError(f"tensor {name!r}: dtype {arr.dtype} has no safetensors equivalent")
    return np.asarray(arr, dtype=dtype, order="C")  # keeps 0-d shapes, unlike ascontiguousarray


def _prepared(tensors: Mapping[str, Any]) -> dict[str, np.ndarray]:
    if not isinstance(tensors, Mapping):
        raise SafetensorsError(f"tensors must be a mapping of name to array, got {type(tensors).__name__}")
    out = {}
    for name in sorted(tensors):
        if not isinstance(name, str) or not name:
            raise SafetensorsError(f"tensor names must be non-empty strings, got {name!r}")
        if name == METADATA_KEY:
            raise SafetensorsError(f"{METADATA_KEY!r} is reserved and cannot name a tensor")
        out[name] = _little_endian(np.asarray(tensors[name]), name)
    return out


def _checked_metadata(metadata: Mapping[str, str] | None) -> dict[str, str] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping):
        raise SafetensorsError(f"metadata must be a mapping of str to str, got {type(metadata).__name__}")
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise SafetensorsError(f"metadata must map str to str, got {k!r}: {v!r}")
    return dict(metadata) or None


def encode_safetensors(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """The safetensors bytes of `tensors` and `metadata` (the reference layout: sorted, aligned, contiguous)."""
    return _save(_prepared(tensors), metadata=_checked_metadata(metadata))


def save_safetensors(
    path_or_fileobj: str | os.PathLike[str] | BinaryIO | None,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> bytes | None:
    """Write safetensors to a path or binary file object and return None; with None, return the bytes.

    Writing to a path is a plain write, not an atomic one: `ModelStore` does the temp/fsync/rename dance.
    """
    data = encode_safetensors(tensors, metadata)
    if path_or_fileobj is None:
        return data
    if isinstance(path_or_fileobj, (str, os.PathLike)):
        with open(path_or_fileobj, "wb") as f:
            f.write(data)
        return None
    if not callable(getattr(path_or_fileobj, "write", None)):
        raise TypeError(f"expected a path, a binary file or None, got {type(path_or_fileobj).__name__}")
    path_or_fileobj.write(data)
    return None


def _owned(name: str, arr: np.ndarray) -> np.ndarray:
    if arr.dtype.kind == "b" and arr.size and arr.view(np.uint8).max() > 1:
        raise SafetensorsError(f"tensor {name!r}: BOOL tensor holds bytes other than 0 and 1")
    return np.array(arr, dtype=arr.dtype.newbyteorder("="), copy=True, order="C")


def load_safetensors(data: bytes | bytearray | memoryview) -> dict[str, np.ndarray]:
    """Every tensor of safetensors `data` as an owned, writable copy; `SafetensorsError` for a bad file."""
    try:
        tensors = _load(bytes(data))
    except SafetensorError as e:
        raise SafetensorsError(str(e)) from None
    except KeyError as e:  # a dtype the library knows and NumPy has no type for
        raise SafetensorsError(f"unsupported dtype {e.args[0]!r} (known: {list(DTYPES)})") from None
    return {name: _owned(name, arr) for name, arr in sorted(tensors.items())}

"""A small, strict safetensors reader/writer in plain NumPy (no pickle, no torch, no `safetensors`).

Layout: 8-byte little-endian u64 header length N, N bytes of UTF-8 JSON header, then the byte buffer.
The header maps tensor names to {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to
the buffer) plus an optional "__metadata__" {str: str}. The writer lays tensors out sorted by name,
contiguous, little-endian, and pads the header with spaces so the buffer starts 8-byte aligned (as the
reference implementation does).

The reader treats the file as hostile: it validates the whole header (sizes, dtypes, shapes, offsets,
exact coverage of the buffer) before it touches a single tensor byte, and every violation raises
`SafetensorsError` (a `ValueError`).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from .errors import SafetensorsError

__all__ = [
    "DTYPES",
    "MAX_HEADER_BYTES",
    "SafetensorsError",
    "SafetensorsHeader",
    "TensorInfo",
    "encode_safetensors",
    "load_safetensors",
    "load_safetensors_with_metadata",
    "parse_header",
    "save_safetensors",
]

#: Largest header accepted, so a forged length cannot make us allocate or parse gigabytes of JSON.
MAX_HEADER_BYTES = 100 * 1024 * 1024
#: Most dimensions a tensor may declare; far above any real model, bounds the work on a forged header.
MAX_NDIM = 32
METADATA_KEY = "__metadata__"
_TENSOR_FIELDS = frozenset({"dtype", "shape", "data_offsets"})

#: safetensors dtype name -> little-endian NumPy dtype. BF16 and F8 types are absent: NumPy has no
#: native type for them, and silently reinterpreting their bits would be worse than refusing.
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
_NAME_OF_KIND: dict[tuple[str, int], str] = {(dt.kind, dt.itemsize): name for name, dt in DTYPES.items()}


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One validated header entry; `begin`/`end` are offsets into the byte buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True, slots=True)
class SafetensorsHeader:
    """A fully validated header: every offset in it is known to lie inside the buffer."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    buffer_len: int


# --------------------------------------------------------------------------------------------- writing


def _dtype_name(arr: np.ndarray, name: str) -> str:
    key = (arr.dtype.kind, arr.dtype.itemsize)
    if key not in _NAME_OF_KIND:
        raise SafetensorsError(f"tensor {name!r}: dtype {arr.dtype} has no safetensors equivalent")
    return _NAME_OF_KIND[key]


def _prepare(tensors: Mapping[str, Any]) -> list[tuple[str, str, np.ndarray]]:
    """Check names and dtypes; return (name, dtype name, little-endian array) sorted by name."""
    if not isinstance(tensors, Mapping):
        raise SafetensorsError(f"tensors must be a mapping of name to array, got {type(tensors).__name__}")
    out = []
    for name in sorted(tensors):
        if not isinstance(name, str) or not name:
            raise SafetensorsError(f"tensor names must be non-empty strings, got {name!r}")
        if name == METADATA_KEY:
            raise SafetensorsError(f"{METADATA_KEY!r} is reserved and cannot name a tensor")
        arr = np.asarray(tensors[name])
        dname = _dtype_name(arr, name)
        arr = np.asarray(arr, dtype=DTYPES[dname])  # tobytes(order="C") handles non-contiguous views
        out.append((name, dname, arr))
    return out


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise SafetensorsError(f"metadata must be a mapping of str to str, got {type(metadata).__name__}")
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise SafetensorsError(f"metadata must map str to str, got {k!r}: {v!r}")
    return dict(metadata)


def encode_safetensors(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """Encode `tensors` (sorted by name, contiguous, little-endian) and `metadata` as safetensors bytes."""
    prepared = _prepare(tensors)
    meta = _check_metadata(metadata)
    header: dict[str, Any] = {}
    if meta:
        header[METADATA_KEY] = meta
    offset = 0
    for name, dname, arr in prepared:
        end = offset + arr.nbytes
        header[name] = {"dtype": dname, "shape": list(arr.shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)  # the buffer starts 8-byte aligned
    parts = [struct.pack("<Q", len(raw)), raw]
    parts.extend(arr.tobytes(order="C") for _, _, arr in prepared)
    return b"".join(parts)


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


# --------------------------------------------------------------------------------------------- reading


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise SafetensorsError(f"header has duplicate key {k!r}")
        out[k] = v
    return out


def _reject_constant(name: str) -> Any:
    raise SafetensorsError(f"header contains the non-JSON constant {name}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_entry(name: str, entry: Any, buffer_len: int) -> TensorInfo:
    if not name:
        raise SafetensorsError("header has a tensor with an empty name")
    if not isinstance(entry, dict):
        raise SafetensorsError(f"tensor {name!r}: header entry must be an object, got {type(entry).__name__}")
    keys = set(entry)
    if keys != _TENSOR_FIELDS:
        missing, extra = sorted(_TENSOR_FIELDS - keys), sorted(keys - _TENSOR_FIELDS)
        raise SafetensorsError(f"tensor {name!r}: header entry lacks fields {missing} / has unknown {extra}")
    dtype = entry["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise SafetensorsError(
            f"tensor {name!r}: unknown or unsupported dtype {dtype!r} (known: {list(DTYPES)})"
        )
    shape = entry["shape"]
    if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(_is_int(d) and d >= 0 for d in shape):
        raise SafetensorsError(
            f"tensor {name!r}: shape must be a list of at most {MAX_NDIM} non-negative ints, got {shape!r}"
        )
    offsets = entry["data_offsets"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise SafetensorsError(f"tensor {name!r}: data_offsets must be [begin, end] ints, got {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end <= buffer_len:
        raise SafetensorsError(
            f"tensor {name!r}: data_offsets [{begin}, {end}] out of bounds of the {buffer_len}-byte buffer"
        )
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != nbytes:
        raise SafetensorsError(
            f"tensor {name!r}: data_offsets span {end - begin} bytes, but shape {shape} of {dtype} "
            f"needs {nbytes}"
        )
    return TensorInfo(name=name, dtype=dtype, shape=tuple(shape), begin=begin, end=end)


def parse_header(data: bytes | bytearray | memoryview) -> SafetensorsHeader:
    """Parse and fully bounds-check a safetensors header; nothing past it is read."""
    size = len(data)
    if size < 8:
        raise SafetensorsError(f"file is {size} bytes, too short for the 8-byte header length")
    (n,) = struct.unpack_from("<Q", data, 0)
    if n > MAX_HEADER_BYTES:
        raise SafetensorsError(f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if n > size - 8:
        raise SafetensorsError(f"header length {n} exceeds the file size ({size} bytes, truncated file?)")
    try:
        text = bytes(data[8 : 8 + n]).decode("utf-8")
    except UnicodeDecodeError as e:
        raise SafetensorsError(f"header is not valid UTF-8: {e}") from None
    try:
        header = json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except SafetensorsError:
        raise
    except (ValueError, RecursionError) as e:
        raise SafetensorsError(f"header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"header must be a JSON object, got {type(header).__name__}")

    metadata = header.pop(METADATA_KEY, {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError(f"{METADATA_KEY} must be an object of str to str")

    data_start = 8 + n
    buffer_len = size - data_start
    infos = {name: _parse_entry(name, entry, buffer_len) for name, entry in header.items()}

    # The tensors must tile the buffer exactly: no overlap (aliasing), no gap, no trailing bytes.
    expected, prev = 0, None
    for info in sorted(infos.values(), key=lambda t: (t.begin, t.end)):
        if info.begin < expected:
            raise SafetensorsError(
                f"tensor {info.name!r} [{info.begin}, {info.end}] overlaps tensor {prev!r} "
                f"(which ends at {expected})"
            )
        if info.begin > expected:
            raise SafetensorsError(f"gap in the buffer: bytes [{expected}, {info.begin}) belong to no tensor")
        expected, prev = info.end, info.name
    if expected != buffer_len:
        raise SafetensorsError(
            f"tensors cover {expected} bytes but the buffer holds {buffer_len} (truncated or trailing bytes)"
        )
    return SafetensorsHeader(tensors=infos, metadata=metadata, data_start=data_start, buffer_len=buffer_len)


def _read_tensor(data: bytes | bytearray | memoryview, start: int, info: TensorInfo) -> np.ndarray:
    le = DTYPES[info.dtype]
    count = math.prod(info.shape)
    if count == 0:
        return np.empty(info.shape, dtype=le.newbyteorder("="))
    view = np.frombuffer(data, dtype=le, count=count, offset=start + info.begin).reshape(info.shape)
    if info.dtype == "BOOL" and view.view(np.uint8).max() > 1:
        raise SafetensorsError(f"tensor {info.name!r}: BOOL tensor holds bytes other than 0 and 1")
    return view.astype(le.newbyteorder("="), copy=True)  # owned, writable, native byte order


def load_safetensors_with_metadata(
    data: bytes | bytearray | memoryview,
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Validate the header, then return (tensors as owned writable copies, metadata)."""
    header = parse_header(data)
    start = header.data_start
    tensors = {name: _read_tensor(data, start, info) for name, info in sorted(header.tensors.items())}
    return tensors, header.metadata


def load_safetensors(data: bytes | bytearray | memoryview) -> dict[str, np.ndarray]:
    """Validate the header, then return every tensor as an owned, writable copy."""
    return load_safetensors_with_metadata(data)[0]

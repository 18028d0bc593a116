"""Holdout sets for the validation guard: labelled inputs a candidate version is checked on before it serves.

Kept beside a model's versions (tensors `inputs` float32, or uint8 for raw pixels, and `labels` int64):
`{root}/{model}/holdout.safetensors`, an operator's upload, replaced atomically; and
`{root}/{model}/holdout.default.safetensors`, the set the model came with (the shipped model's, or the one
`mpserve train` wrote). Or an operator's own file (safetensors with those two tensors, or an `.npz` with
arrays `inputs` and `labels`, read without pickle). The guard takes the upload, else the operator's file,
else the default.
The sha256 of the bytes names the set, so figures measured on different holdouts are never compared.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from .errors import ModelStoreError
from .safetensors_io import encode_safetensors, load_safetensors

HOLDOUT_FILE = "holdout.safetensors"
DEFAULT_HOLDOUT_FILE = "holdout.default.safetensors"
#: an operator's upload, or the set the model came with (shipped, or written by `mpserve train`)
HoldoutKind = Literal["uploaded", "default"]


@dataclass(frozen=True)
class Holdout:
    inputs: np.ndarray  # (n, *input_shape) float32
    labels: np.ndarray  # (n,) int64
    sha256: str

    def __len__(self) -> int:
        return len(self.labels)

    def example_ids(self) -> list[str]:
        """A name for each example (the set's sha256 and its row), for caches of figures measured on it."""
        return [f"holdout:{self.sha256}:{i}" for i in range(len(self))]


def encode_holdout(inputs: np.ndarray, labels: np.ndarray) -> bytes:
    """The safetensors bytes of a holdout set (what the store keeps and what an operator may ship)."""
    # raw pixels stay bytes (a quarter of the size); the guard reads every set as float32
    x = np.ascontiguousarray(inputs, np.uint8 if inputs.dtype == np.uint8 else np.float32)
    y = np.ascontiguousarray(labels, np.int64)
    if y.ndim != 1 or len(x) != len(y) or len(y) == 0:
        raise ModelStoreError(f"a holdout needs n >= 1 inputs and n labels, got {x.shape} and {y.shape}")
    if not np.isfinite(x).all():
        raise ModelStoreError("holdout inputs must be finite")
    return encode_safetensors({"inputs": x, "labels": y})


def decode_holdout(data: bytes, where: str = "holdout") -> Holdout:
    """Parse and check holdout bytes (safetensors)."""
    tensors = load_safetensors(data)
    if set(tensors) != {"inputs", "labels"}:
        raise ModelStoreError(f"{where}: expected tensors 'inputs' and 'labels', found {sorted(tensors)}")
    x, y = tensors["inputs"].astype(np.float32), tensors["labels"].astype(np.int64)
    if y.ndim != 1 or len(x) != len(y) or len(y) == 0:
        raise ModelStoreError(f"{where}: {x.shape} inputs do not match {y.shape} labels")
    return Holdout(x, y, hashlib.sha256(data).hexdigest())


def read_holdout_file(path: str | os.PathLike[str]) -> Holdout:
    """An operator's holdout file: `.npz` (no pickle) or safetensors, both with `inputs` and `labels`."""
    path = Path(path)
    data = path.read_bytes()
    if path.suffix == ".npz":
        import io

        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            if "inputs" not in npz or "labels" not in npz:
                raise ModelStoreError(f"{path}: an .npz holdout needs arrays 'inputs' and 'labels'")
            x, y = npz["inputs"], npz["labels"]
        return decode_holdout(encode_holdout(x, y), str(path))
    return decode_holdout(data, str(path))

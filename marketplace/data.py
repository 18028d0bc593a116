"""Fashion-MNIST from local IDX files (Debian's `dataset-fashion-mnist`); nothing is downloaded."""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


@dataclass(frozen=True)
class Split:
    x: np.ndarray  # (n, 1, 28, 28) uint8 pixels
    y: np.ndarray  # (n,) int64 labels

    def without(self, cls: int | None) -> Split:
        """The split with one class left out (a base model that has never seen it)."""
        if cls is None:
            return self
        keep = self.y != cls
        return Split(self.x[keep], self.y[keep])

    def stratified(self, per_class: int, seed: int = 0) -> Split:
        """``per_class`` examples of each class, drawn without replacement (a holdout set for the guard)."""
        rng = np.random.default_rng(seed)
        pick = np.sort(np.concatenate([rng.choice(np.flatnonzero(self.y == c), min(per_class, int((self.y == c).sum())),
                                                  replace=False) for c in np.unique(self.y)]))
        return Split(self.x[pick], self.y[pick])

    def only(self, cls: int) -> Split:
        keep = self.y == cls
        return Split(self.x[keep], self.y[keep])


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped), checked against the shape its header declares."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims}, file holds {len(data) - offset} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def _find(directory: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (directory / name).exists():
            return directory / name
    raise FileNotFoundError(
        f"{stem}[.gz] not found in {directory}: install Debian's dataset-fashion-mnist or pass --data-dir")


def load_fashion_mnist(data_dir: str | os.PathLike[str] | None = None) -> dict[str, Split]:
    """{'train': Split, 'test': Split} with images as (n, 1, 28, 28) uint8."""
    directory = Path(data_dir or os.environ.get("MPSERVE_DATASET_DIR") or DEFAULT_DIR)
    out = {}
    for split, (images, labels) in _FILES.items():
        x = _read_idx(_find(directory, images))
        y = _read_idx(_find(directory, labels)).astype(np.int64)
        if len(x) != len(y):
            raise ValueError(f"{split}: {len(x)} images but {len(y)} labels")
        out[split] = Split(x.reshape(-1, 1, 28, 28), y)
    return out

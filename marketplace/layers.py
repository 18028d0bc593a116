"""Layers that run all V vendors of a group as one kernel.

Activations are vendor-major, (V, k, *features): row v holds the k inputs that take vendor v in this
group, and every parameter arrives stacked as (V, *shape), row v being θ + δ(σ_v). Each layer is
written so that V is the outermost loop of one kernel: a batched matmul for linear layers and a
convolution spelled out over a pooled view with V outermost (tinygrad's grouped conv2d puts the groups
inside the batch and ran 3.6x slower here). With V=1 this is plain inference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from tinygrad import Tensor


class Layer:
    """A layer: parameter shapes, their initial values, and a forward over stacked vendor weights."""

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {}

    def init(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {}

    def __call__(self, x: Tensor, w: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError


def _uniform(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    bound = 1.0 / math.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=shape).astype(np.float32)


@dataclass
class Conv2d(Layer):
    cin: int
    cout: int
    kernel: int
    padding: int = 0

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"weight": (self.cout, self.cin, self.kernel, self.kernel), "bias": (self.cout,)}

    def init(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        fan_in = self.cin * self.kernel * self.kernel
        return {name: _uniform(rng, shape, fan_in) for name, shape in self.param_shapes().items()}

    def __call__(self, x: Tensor, w: dict[str, Tensor]) -> Tensor:
        V, k, cin, _, _ = x.shape
        kk = self.kernel
        if self.padding:
            x = x.pad(((0, 0), (0, 0), (0, 0), (self.padding, self.padding), (self.padding, self.padding)))
        patches = x._pool((kk, kk))  # (V, k, cin, oh, ow, kk, kk), a view
        oh, ow = patches.shape[3:5]
        prod = patches.reshape(V, k, 1, cin, oh, ow, kk, kk) * w["weight"].reshape(V, 1, self.cout, cin, 1, 1, kk, kk)
        return prod.sum((3, 6, 7)) + w["bias"].reshape(V, 1, self.cout, 1, 1)


@dataclass
class Linear(Layer):
    fin: int
    fout: int

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"weight": (self.fout, self.fin), "bias": (self.fout,)}

    def init(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {name: _uniform(rng, shape, self.fin) for name, shape in self.param_shapes().items()}

    def __call__(self, x: Tensor, w: dict[str, Tensor]) -> Tensor:
        return x.matmul(w["weight"].transpose(1, 2)) + w["bias"].unsqueeze(1)


@dataclass
class InstanceNorm(Layer):
    channels: int
    eps: float = 1e-5

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"weight": (self.channels,), "bias": (self.channels,)}

    def init(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {"weight": np.ones(self.channels, np.float32), "bias": np.zeros(self.channels, np.float32)}

    def __call__(self, x: Tensor, w: dict[str, Tensor]) -> Tensor:
        V, _, c, _, _ = x.shape
        normed = x.layernorm(axis=(3, 4), eps=self.eps)
        return normed * w["weight"].reshape(V, 1, c, 1, 1) + w["bias"].reshape(V, 1, c, 1, 1)


class ReLU(Layer):
    def __call__(self, x: Tensor, w: dict[str, Tensor]) -> Tensor:
        return x.relu()


@dataclass
class MaxPool2d(Layer):
    kernel: int = 2

    def __call__(self, x: Tensor, w: dict[str, Tensor]) -> Tensor:
        V, k, *rest = x.shape
        pooled = x.reshape(V * k, *rest).max_pool2d(self.kernel)
        return pooled.reshape(V, k, *pooled.shape[1:])


class Flatten(Layer):
    def __call__(self, x: Tensor, w: dict[str, Tensor]) -> Tensor:
        return x.reshape(x.shape[0], x.shape[1], -1)

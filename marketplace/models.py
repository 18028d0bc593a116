"""Models as ordered layer groups, and a registry of them by name.

A group is the unit that gets one vendor per input: its parameters are perturbed together by one
seed. A user's own model plugs in as `package.module:factory`, a callable returning a `ModelSpec`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from marketplace.layers import Conv2d, Flatten, InstanceNorm, Layer, Linear, MaxPool2d, ReLU


@dataclass(frozen=True)
class LayerGroup:
    """Named layers applied in order; parameter keys are `{group}.{layer}.{param}`."""

    layers: tuple[tuple[str, Layer], ...]


@dataclass(frozen=True)
class ModelSpec:
    """Everything the engine needs to know about a model, and nothing about its weights."""

    name: str
    groups: tuple[LayerGroup, ...]
    input_shape: tuple[int, ...]
    num_classes: int
    input_scale: float = 1.0
    input_offset: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)

    def group_shapes(self, s: int) -> dict[str, tuple[int, ...]]:
        """Parameter shapes of group s, in sorted key order (the order the delta counter walks)."""
        shapes = {
            f"{s}.{lname}.{pname}": shape
            for lname, layer in self.groups[s].layers
            for pname, shape in layer.param_shapes().items()
        }
        return dict(sorted(shapes.items()))

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v for s in range(len(self.groups)) for k, v in self.group_shapes(s).items()}

    def group_sizes(self) -> list[int]:
        return [sum(int(np.prod(v)) for v in self.group_shapes(s).values()) for s in range(len(self.groups))]

    def init_params(self, seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        params: dict[str, np.ndarray] = {}
        for s, group in enumerate(self.groups):
            for lname, layer in group.layers:
                for pname, value in layer.init(rng).items():
                    params[f"{s}.{lname}.{pname}"] = value
        return params

    @property
    def architecture(self) -> dict[str, Any]:
        return {"name": self.name, "config": dict(self.config)}


def beautiful_mnist() -> ModelSpec:
    """tinygrad's beautiful_mnist, split into the three groups the upstream Marketplace code uses."""
    g0 = LayerGroup((("conv1", Conv2d(1, 32, 5)), ("relu1", ReLU()), ("conv2", Conv2d(32, 32, 5)),
                     ("relu2", ReLU()), ("norm", InstanceNorm(32)), ("pool", MaxPool2d(2))))
    g1 = LayerGroup((("conv1", Conv2d(32, 64, 3)), ("relu1", ReLU()), ("conv2", Conv2d(64, 64, 3)),
                     ("relu2", ReLU()), ("norm", InstanceNorm(64)), ("pool", MaxPool2d(2)),
                     ("flatten", Flatten())))
    g2 = LayerGroup((("fc", Linear(576, 10)),))
    return ModelSpec("beautiful_mnist", (g0, g1, g2), (1, 28, 28), 10, input_scale=1 / 255.0)


def mlp(hidden: tuple[int, ...] | list[int] = (128,), input_shape: tuple[int, ...] | list[int] = (1, 28, 28),
        num_classes: int = 10, input_scale: float = 1 / 255.0) -> ModelSpec:
    """A multi-layer perceptron, one group per linear layer: small and fast for tests."""
    widths = [int(np.prod(input_shape)), *hidden, num_classes]
    groups = []
    for i, (fin, fout) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers: list[tuple[str, Layer]] = [("flatten", Flatten())] if i == 0 else []
        layers.append(("fc", Linear(fin, fout)))
        if i < len(widths) - 2:
            layers.append(("relu", ReLU()))
        groups.append(LayerGroup(tuple(layers)))
    config = {"hidden": list(hidden), "input_shape": list(input_shape), "num_classes": num_classes,
              "input_scale": input_scale}
    return ModelSpec("mlp", tuple(groups), tuple(input_shape), num_classes, input_scale=input_scale,
                     config=config)


REGISTRY: dict[str, Callable[..., ModelSpec]] = {"beautiful_mnist": beautiful_mnist, "mlp": mlp}
_FACTORY_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def get_model(name: str, config: dict[str, Any] | None = None) -> ModelSpec:
    """A registered model by name, or a user's `module:factory` (an operator's setting, never a client's)."""
    config = config or {}
    if name in REGISTRY:
        return REGISTRY[name](**config)
    if _FACTORY_REF.match(name):
        module, attr = name.split(":")
        spec = getattr(importlib.import_module(module), attr)(**config)
        if not isinstance(spec, ModelSpec):
            raise TypeError(f"{name} returned {type(spec).__name__}, not a ModelSpec")
        return dataclasses.replace(spec, name=name, config=dict(config))
    raise KeyError(f"unknown model {name!r}: registered are {sorted(REGISTRY)}, or give 'module:factory'")


def spec_from_architecture(arch: dict[str, Any]) -> ModelSpec:
    """Rebuild a spec from a manifest's architecture block."""
    return get_model(arch["name"], arch.get("config") or {})


def params_digest(params: dict[str, np.ndarray], keys: list[str] | None = None) -> str:
    """A sha256 over the named tensors (all by default), keys sorted: names weights by value, so figures measured
    under them can be cached across versions that share them (a re-seeded version keeps its parent's weights)."""
    h = hashlib.sha256()
    for k in sorted(params if keys is None else keys):
        h.update(k.encode())
        h.update(np.ascontiguousarray(params[k]).tobytes())
    return h.hexdigest()

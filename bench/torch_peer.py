"""The same model in PyTorch, from a ModelSpec and its weights: the peer `bench/inference.py --peer torch` times.

A team choosing mpserve compares it with what it would otherwise serve, so the peer must be the very model:
each layer maps to its PyTorch twin (InstanceNorm with the spec's eps, affine; max-pool; flatten) and
`check_peer` holds its logits to the engine's. PyTorch is an optional extra of the benchmark only
(`pip install .[peer]`): nothing in serving or the tests imports it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from marketplace.layers import Conv2d, Flatten, InstanceNorm, Layer, Linear, MaxPool2d, ReLU
from marketplace.models import ModelSpec


def _module(torch: Any, layer: Layer, weights: dict[str, np.ndarray]) -> Any:
    nn = torch.nn
    if isinstance(layer, Conv2d):
        m = nn.Conv2d(layer.cin, layer.cout, layer.kernel, padding=layer.padding)
    elif isinstance(layer, Linear):
        m = nn.Linear(layer.fin, layer.fout)
    elif isinstance(layer, InstanceNorm):
        m = nn.InstanceNorm2d(layer.channels, eps=layer.eps, affine=True)
    elif isinstance(layer, ReLU):
        return nn.ReLU()
    elif isinstance(layer, MaxPool2d):
        return nn.MaxPool2d(layer.kernel)
    elif isinstance(layer, Flatten):
        return nn.Flatten()
    else:
        raise ValueError(f"no PyTorch twin for {type(layer).__name__}")
    with torch.no_grad():
        for name, value in weights.items():
            getattr(m, name).copy_(torch.from_numpy(np.ascontiguousarray(value, np.float32)))
    return m


def torch_model(spec: ModelSpec, params: dict[str, np.ndarray], device: str = "cpu") -> Any:
    """An eval-mode ``torch.nn.Sequential`` on ``device`` computing the spec's leader logits (inputs scaled as the
    engine does)."""
    import torch

    if str(device).startswith("cuda"):  # fp32 as the engine computes it: PyTorch's CUDA convs default to TF32, whose
        torch.backends.cudnn.allow_tf32 = False  # logits missed the engine's by 0.011 on an H200 (tinygrad: no TF32)
        torch.backends.cuda.matmul.allow_tf32 = False
    mods = []
    for s, group in enumerate(spec.groups):
        for lname, layer in group.layers:
            prefix = f"{s}.{lname}."
            mods.append(_module(torch, layer, {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}))
    return torch.nn.Sequential(*mods).eval().to(device)


def torch_logits(model: Any, spec: ModelSpec, x: np.ndarray) -> np.ndarray:
    """Host inputs in, host logits out, as the engine's forward: on a GPU the copies both ways are timed too."""
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        h = torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(device) * spec.input_scale + spec.input_offset
        return model(h).cpu().numpy()


def check_peer(model: Any, spec: ModelSpec, engine_logits: np.ndarray, x: np.ndarray, atol: float = 1e-3) -> float:
    """The largest logit difference to the engine's on ``x``; raises if the peer is not the same model."""
    diff = float(np.abs(torch_logits(model, spec, x) - engine_logits).max())
    if not diff <= atol:
        raise AssertionError(f"the PyTorch peer differs from the engine by {diff} (> {atol}): not the same model")
    return diff

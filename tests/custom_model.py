"""A user's own model, plugged in as `tests.custom_model:tiny` (what a `module:factory` reference names)."""

from marketplace.layers import Flatten, Linear, ReLU
from marketplace.models import LayerGroup, ModelSpec


def tiny(width: int = 8) -> ModelSpec:
    groups = (LayerGroup((("flatten", Flatten()), ("fc", Linear(16, width)), ("relu", ReLU()))),
              LayerGroup((("fc", Linear(width, 3)),)))
    return ModelSpec("tiny", groups, (4, 4), 3)


def not_a_model() -> int:
    return 3

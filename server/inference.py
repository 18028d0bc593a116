"""The one inference path behind every predict route (native ``/predict`` and the Open Inference Protocol).

Both front ends only decode their own request format into a validated ``(n, *input_shape)`` float32 array;
the size limit, the batcher, the engine and the records written to Redis (which ``/label`` reads later) are
this module's, so an answer means the same thing whichever protocol asked for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from marketplace.head import softmax
from server.errors import ApiError
from server.settings import ServerSettings
from server.state import ModelContext


@dataclass(frozen=True)
class Inference:
    """What a request gets back: the version that served it, one record id per input, the probabilities."""

    version: int
    ids: list[str | None]  # None each: learning is off, nothing was recorded
    probabilities: np.ndarray  # (n, C) float64

    @property
    def labels(self) -> np.ndarray:
        """The predicted classes (argmax of the probabilities), (n,) int64."""
        return self.probabilities.argmax(axis=1).astype(np.int64)


def check_input_count(settings: ServerSettings, n: int) -> None:
    """A 413 for more inputs than ``max_inputs_per_request``, before anything is decoded further."""
    limit = settings.max_inputs_per_request
    if n > limit:
        raise ApiError(413, f"{n} inputs in one request; the limit is {limit} (max_inputs_per_request): "
                            "split the request")


async def infer(ctx: ModelContext, x: np.ndarray, labels: np.ndarray | None, client: str | None) -> Inference:
    """Run validated inputs through the model's batcher (recorded for learning unless it is off)."""
    answer = await ctx.batcher.submit(x, labels, client)
    probs = softmax(answer.logits)
    ids: list[str | None] = list(answer.ids) if answer.ids is not None else [None] * len(probs)
    return Inference(answer.version, ids, probs)

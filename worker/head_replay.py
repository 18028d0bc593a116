"""The head's replay evidence: features of the labelled inputs the API kept whole, and the known-data damping.

`head_gradient=replay` (marketplace.head) needs each kept input's features under the serving version, which
one forward pass of the feature groups gives (no backward pass: the head's gradient is an outer product), and
the damping built from the holdout's features, which change only when the feature groups or the holdout do.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np

from marketplace.engine import Engine, leader_logits
from marketplace.head import HeadReplay, feature_spec, known_damping, linear_head
from marketplace.models import ModelSpec
from model_store import Holdout

log = logging.getLogger(__name__)


def head_features(engine: Engine, params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The head's input for ``x``: the unperturbed feature groups' output (an engine on `feature_spec`)."""
    return leader_logits(engine, {k: v for k, v in params.items() if k in engine.spec.param_shapes()}, x)


def _digest(params: dict[str, np.ndarray], keys: list[str]) -> str:
    h = hashlib.sha256()
    for k in sorted(keys):
        h.update(k.encode())
        h.update(np.ascontiguousarray(params[k]).tobytes())
    return h.hexdigest()


class HeadReplaySource:
    """Builds a `HeadReplay` for one model per update; caches the feature engine and the damping."""

    def __init__(self, damping: float, batch: int = 256) -> None:
        self.strength, self.batch = damping, batch
        self._engine: tuple[str, Engine] | None = None
        self._damping: tuple[tuple[str, str], np.ndarray | None] | None = None

    def evidence(self, spec: ModelSpec, params: dict[str, np.ndarray], inputs: np.ndarray, labels: np.ndarray,
                 holdout: Holdout | None) -> HeadReplay | None:
        """The kept inputs' features and labels under ``params`` (None: no input, or no linear head to learn)."""
        if linear_head(spec) is None or len(spec.groups) < 2 or not len(labels):  # feature_spec would refuse
            return None
        engine = self._feature_engine(spec)
        features = head_features(engine, params, inputs.astype(np.float32)).astype(np.float64)
        finite = np.isfinite(features).all(axis=1)  # an overflow in the feature groups must not reach the step
        if not finite.any():
            return None
        return HeadReplay(features[finite], np.asarray(labels, np.int64)[finite],
                          self._known_damping(params, engine, holdout))

    def _feature_engine(self, spec: ModelSpec) -> Engine:
        arch = repr(spec.architecture)
        if self._engine is None or self._engine[0] != arch:
            self._engine = (arch, Engine(feature_spec(spec), 1, buckets=[self.batch]))
        return self._engine[1]

    def _known_damping(self, params: dict[str, np.ndarray], engine: Engine, holdout: Holdout | None
                       ) -> np.ndarray | None:
        """The damping from the holdout's features; recomputed only when the holdout or the feature groups change."""
        if holdout is None or self.strength <= 0:
            return None
        key = (holdout.sha256, repr(engine.spec.architecture) + _digest(params, list(engine.spec.param_shapes())))
        if self._damping is None or self._damping[0] != key:
            known = head_features(engine, params, holdout.inputs.astype(np.float32))
            known = known[np.isfinite(known).all(axis=1)]  # as the kept inputs': an overflow must not poison it
            self._damping = (key, known_damping(known, self.strength))
            log.info("head damping from %d holdout features (strength %g)", len(known), self.strength)
        return self._damping[1]

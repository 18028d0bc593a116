"""The head's replay evidence: features of the labelled inputs the API kept whole, and the known-data damping.

`head_gradient=replay` (marketplace.head) needs each kept input's features under the serving version, which
one forward pass of the feature groups gives (no backward pass: the head's gradient is an outer product), and
the damping built from the holdout's features, which change only when the feature groups or the holdout do.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from marketplace.head import HeadReplay, known_damping
from marketplace.leader import LeaderAnswers
from model_store import Holdout

log = logging.getLogger(__name__)


class HeadReplaySource:
    """Builds a `HeadReplay` for one model per update; caches the damping."""

    def __init__(self, damping: float) -> None:
        self.strength = damping
        self._damping: tuple[tuple[str, str], np.ndarray | None] | None = None

    def evidence(self, leader: LeaderAnswers, params: dict[str, np.ndarray], inputs: np.ndarray, labels: np.ndarray,
                 holdout: Holdout | None, ids: Sequence[str] | None = None) -> HeadReplay | None:
        """The kept inputs' features and labels under ``params`` (None: no input, or no linear head to learn).

        ``leader``: the model's answers (the guard's, so both share its cache of features); ``ids`` name the
        inputs (their record ids), so an input's features are computed once while the feature groups stay as they
        are (None: every input runs them)."""
        if leader.head is None or not len(labels):  # no features to learn from
            return None
        x = inputs.astype(np.float32)
        features = leader.features(params, x, ids).astype(np.float64)
        finite = np.isfinite(features).all(axis=1)  # an overflow in the feature groups must not reach the step
        if not finite.any():
            return None
        return HeadReplay(features[finite], np.asarray(labels, np.int64)[finite],
                          self._known_damping(params, leader, holdout))

    def _known_damping(self, params: dict[str, np.ndarray], leader: LeaderAnswers, holdout: Holdout | None
                       ) -> np.ndarray | None:
        """The damping from the holdout's features; recomputed only when the holdout or the feature groups change."""
        if holdout is None or self.strength <= 0:
            return None
        key = (holdout.sha256, repr(leader.spec.architecture) + leader.body_digest(params))
        if self._damping is None or self._damping[0] != key:
            known = leader.features(params, holdout.inputs.astype(np.float32), holdout.example_ids())
            known = known[np.isfinite(known).all(axis=1)]  # as the kept inputs': an overflow must not poison it
            self._damping = (key, known_damping(known, self.strength))
            log.info("head damping from %d holdout features (strength %g)", len(known), self.strength)
        return self._damping[1]

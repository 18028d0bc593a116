"""The unperturbed model's answers on inputs it has seen before, at the cost of its head when only the head moved.

The worker judges every candidate on the same holdout set and on kept inputs it has mostly judged already, and
the replay head needs the kept inputs' features under the serving version. With the shipped defaults only the
head (one linear layer) learns, so candidate, parent and anchor share their feature groups: an input's features
are the same under all of them, and its logits under any of them are one product, h·Wᵀ + b. Features are cached
under a digest of the feature groups' weights and a name for each input (a holdout row, a replay entry id), so
a version whose feature groups did move simply misses the cache and runs them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from marketplace.engine import Engine, leader_logits
from marketplace.head import feature_spec, linear_head
from marketplace.models import params_digest


class LeaderAnswers:
    """Unperturbed logits and head features of one architecture, with the features of named inputs cached.

    ``engine``: a leader-only (V=1) engine of the whole model; the feature groups get an engine of their own,
    built (and compiled) on first use. ``max_rows``: how many inputs' features are kept (the oldest go first).
    """

    def __init__(self, engine: Engine, max_rows: int = 8192) -> None:
        if engine.V != 1:
            raise ValueError("LeaderAnswers needs a leader-only engine (V=1)")
        self.engine, self.spec, self.max_rows = engine, engine.spec, max_rows
        self.head = linear_head(self.spec) if len(self.spec.groups) >= 2 else None
        self._feature_engine: Engine | None = None
        self._body_keys = [] if self.head is None else [k for k in self.spec.param_shapes() if k not in self.head]
        self._body: str | None = None  # the digest of the feature groups the cached rows were computed under
        self._rows: dict[str, np.ndarray] = {}

    def logits(self, params: dict[str, np.ndarray], x: np.ndarray, ids: Sequence[str] | None = None) -> np.ndarray:
        """(n, C) logits of ``params`` unperturbed; ``ids`` name the inputs (stable across calls) so that their
        features are computed once per set of feature-group weights (None: a plain forward pass)."""
        if self.head is None or ids is None:
            return leader_logits(self.engine, params, x)
        w_key, b_key = self.head
        h = self.features(params, x, ids)
        return (h @ params[w_key].astype(np.float32).T + params[b_key].astype(np.float32)).astype(np.float32)

    def features(self, params: dict[str, np.ndarray], x: np.ndarray, ids: Sequence[str] | None = None
                 ) -> np.ndarray:
        """(n, H) float32: the head's input for each input under ``params``' feature groups; with ``ids``, cached
        by name (None: computed, not kept)."""
        if self.head is None:
            raise ValueError("the model's last group is not one linear layer after others: it has no features")
        body = {k: params[k] for k in self._body_keys}
        if ids is None:
            return leader_logits(self._features(), body, np.asarray(x, np.float32))
        if len(ids) != len(x):
            raise ValueError(f"{len(ids)} ids for {len(x)} inputs")
        digest = self.body_digest(params)
        if digest != self._body:
            self._body, self._rows = digest, {}
        missing = [i for i, k in enumerate(ids) if k not in self._rows]
        if missing:
            got = leader_logits(self._features(), body, np.asarray(x[missing], np.float32))
            self._rows.update({ids[i]: row.copy() for i, row in zip(missing, got, strict=True)})
        for k in ids:  # least recently used first: the holdout, judged every time, stays
            self._rows[k] = self._rows.pop(k)
        out = np.stack([self._rows[k] for k in ids]) if len(ids) else np.zeros((0, self.features_size), np.float32)
        for k in list(self._rows)[:max(len(self._rows) - self.max_rows, 0)]:
            del self._rows[k]
        return out

    def body_digest(self, params: dict[str, np.ndarray]) -> str:
        """Names the feature groups' weights of ``params`` (the head's left out): what features are cached under."""
        return params_digest(params, self._body_keys)

    @property
    def features_size(self) -> int:
        """H, the number of features the head weighs."""
        if self.head is None:
            raise ValueError("the model's last group is not one linear layer after others: it has no features")
        return int(self.spec.param_shapes()[self.head[0]][1])

    def _features(self) -> Engine:
        if self._feature_engine is None:
            self._feature_engine = Engine(feature_spec(self.spec), 1, buckets=self.engine.buckets,
                                          device=self.engine.device)
        return self._feature_engine

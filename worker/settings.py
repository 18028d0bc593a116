"""Settings of the reconciler worker: one pydantic-settings class, from MPSERVE_* variables and CLI flags.

Every field is also a command-line flag (``--min-records`` for ``min_records``, see :mod:`common.flags`);
flags override the environment, which overrides the defaults.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.settings_types import ClientNames, ModelNames, VersionNumbers
from marketplace.reconcile import LEARN_GROUPS_PATTERN, ReconcileConfig
from marketplace.update import UpdateConfig
from redis_io.connect import RedisUrl

LogLevel = Literal["critical", "error", "warning", "info", "debug"]


def default_consumer() -> str:
    """hostname-pid: unique per process, so two workers never share a consumer or a lease owner."""
    return f"{socket.gethostname()}-{os.getpid()}"


class WorkerSettings(BaseSettings):
    """Everything the reconciler needs to know; nothing else in the worker reads the environment."""

    model_config = SettingsConfigDict(env_prefix="MPSERVE_", extra="ignore", validate_default=True)

    redis_url: RedisUrl = Field("redis://127.0.0.1:6379/0", description="Redis shared with the API replicas "
                              "(a Redis Cluster: redis+cluster://host:port,host:port)")
    store_dir: Path = Field(Path("./data/store"), description="root of the model store")
    # MPSERVE_MODELS=a,b or a JSON list (see common.settings_types)
    models: ModelNames = Field(default_factory=lambda: ["fashion"],
                                                   description="models to reconcile (a,b or a list)")
    consumer: str = Field(default_factory=default_consumer, min_length=1, max_length=200,
                          description="consumer name in the feedback group (unique per process)")
    min_records: int = Field(256, ge=1, description="reconcile as soon as this many usable records are ready")
    interval_s: float = Field(30.0, gt=0, description="timer: reconcile whatever is usable this long after the last")
    poll_ms: int = Field(200, ge=1, le=60_000, description="longest a stream read blocks (also the request poll)")
    learning_rate: float = Field(0.001, ge=0, description="step size η: an SGD rate for SPSA signal steps, the "
                                                          "step's length for unit steps (0: no group moves)")
    outlier: Literal["none", "zscore", "quantile"] = Field("none", description="outlier filter on loss per cohort")
    outlier_z: float = Field(3.0, gt=0, description="z-score filter: drop |loss - mean| > z·std")
    outlier_quantile: float = Field(0.02, ge=0, lt=0.5, description="quantile filter: share trimmed from each tail")
    attribution: Literal["zscore", "rank"] = Field("zscore", description="credit per record within a cohort")
    normalize: Literal["model", "group"] = Field("model", description="unit direction over the model or per group")
    class_weights: bool = Field(False, description="weight credit by inverse class frequency")
    baseline: Literal["none", "class", "leader"] = Field(
        "leader", description="per-record baseline subtracted before attribution: the leader's loss on the same "
                              "input (paired probes; records without one use class), the record's class mean loss "
                              "in its cohort, or none")
    step: Literal["unit", "signal"] = Field(
        "signal", description="unit: move η along the unit direction (upstream); signal: an SPSA gradient step, "
                              "η an SGD rate, that shrinks when the credits are noise")
    shrink: bool = Field(True, description="signal steps of SPSA directions: weigh each vendor's credit by its "
                                           "evidence, "
                                           "max(0, 1 - t0^2/t^2) with t0 = shrink_t, so credits that noise could "
                                           "explain move nothing")
    shrink_t: float = Field(1.0, ge=0, description="signal steps with shrink: a vendor's credit whose t-statistic is "
                                                  "at most this moves nothing (the factor is max(0, 1 - t0^2/t^2))")
    max_step: float = Field(0.01, ge=0, description="signal steps: largest step of a group, as a share of its "
                                                   "weights' norm (0: no cap)")
    head_gradient: Literal["replay", "logits", "spsa"] = Field(
        "replay", description="signal steps: the head's exact gradient on the labelled inputs the API keeps whole "
                              "(the replay stream; one forward pass of the feature groups), damped along the "
                              "holdout's features (head_damping), the logits estimate where none is kept; logits: "
                              "estimated from the logits its probes moved (C measurements a record, "
                              "marketplace.head); spsa: from loss differences as every other group")
    head_learning_rate: float = Field(0.03, ge=0, description="SGD rate of the head's logits gradient, and of a "
                                                             "replay gradient without a holdout to damp it (its "
                                                             "step is capped by max_step too; a schedule scales it "
                                                             "as η)")
    head_replay_learning_rate: float = Field(1.0, ge=0, description="SGD rate of the damped replay gradient, far "
                                                                    "smaller than the logits one (capped by max_step "
                                                                    "too; a schedule scales it as η)")
    head_damping: float = Field(3000.0, ge=0, description="head_gradient=replay: damp the head's step by up to "
                                                          "1/(1 + this) along the holdout's features, so learning "
                                                          "new inputs keeps the known answers (0: undamped)")
    learn_groups: str = Field("head", pattern=LEARN_GROUPS_PATTERN,
                              description="layer groups that learn: head (the last, default), all, or indices like "
                                          "0,2; the others keep their weights and run unperturbed in new versions")
    probe_scale: float | None = Field(None, gt=0, description="probe scale ε of new versions (unset: the parent's)")
    vendors: int | None = Field(None, ge=1, le=64, description="vendors per group of new versions (unset: the "
                                                               "parent's): more probe directions per update at the "
                                                               "same FLOPs, V copies of the weights on each replica")
    antithetic: bool = Field(False, description="new versions pair their vendors as +δ/−δ (antithetic probes)")
    momentum: float = Field(0.0, ge=0, lt=1, description="heavy-ball β: add β·(θ_n − θ_{n−1}) to each step")
    lr_schedule: Literal["constant", "loss_gap"] = Field(
        "constant", description="step size: constant, or scaled by the gap between the worst class's loss and the mean")
    lr_min_ratio: float = Field(0.1, ge=0, le=1, description="loss_gap schedule: smallest step, as a share of η")
    gap_scale: float = Field(1.0, gt=0, description="loss_gap schedule: the gap (nats) that earns the full step")
    holdout_path: Path | None = Field(None, description="holdout set (.npz or .safetensors with inputs, labels) "
                                                        "for the validation guard; an uploaded one takes precedence")
    guard_tolerance: float = Field(0.005, ge=0, le=1, description="refuse a candidate whose holdout accuracy is "
                                                                  "more than this below the reference")
    guard_class_tolerance: float = Field(0.05, ge=0, le=1, description="refuse a candidate when one class's holdout "
                                                                       "accuracy is more than this below its reference")
    guard_traffic: bool = Field(True, description="also judge a candidate on the recent labelled inputs the API "
                                                  "keeps (its replay stream) against the anchor version, kept frozen")
    guard_traffic_tolerance: float = Field(0.0, ge=0, le=1, description="refuse a candidate whose accuracy on recent "
                                           "labelled inputs is more than this below the anchor's on the same inputs")
    guard_traffic_gain_z: float = Field(2.0, ge=0, description="with the recent-traffic check: a candidate's loss on "
                                        "the recent inputs it is judged on must fall below the serving version's "
                                        "by this many standard errors (paired), so steps that only move the model "
                                        "are refused (0: staying within the tolerances is enough)")
    guard_drift_z: float = Field(3.0, ge=0, description="with the recent-traffic check: a class whose recent "
                                 "traffic the anchor answers this many standard errors worse than its holdout "
                                 "examples has drifted, and leaves the holdout checks (0: never)")
    guard_traffic_max_age_s: int = Field(86400, ge=1, description="recent traffic: labelled inputs no older than "
                                                                  "this")
    guard_traffic_min: int = Field(128, ge=1, description="judge on recent traffic once this many labelled inputs "
                                                          "are kept for the check (with the replay head, on its "
                                                          "side of guard_traffic_share)")
    guard_traffic_share: float = Field(0.5, gt=0, lt=1, description="with the head learning from kept inputs "
                                       "(head_gradient replay): the share of them it never learns from, which the "
                                       "recent-traffic check judges on (each input's side fixed by its record id)")
    reseed_on_refusal: bool = Field(True, description="after a refused candidate, publish the same weights with fresh "
                                                      "seeds, so the next candidate probes new directions")
    version_seed: int | None = Field(None, ge=0, description="seed of the generator that draws each new version's "
                                     "vendor seeds, for reproducible experiments and tests (unset: fresh OS entropy)")
    guard_reference: Literal["anchor", "parent"] = Field(
        "anchor", description="guard reference: the first version checked on this holdout, or the serving one")
    min_cohort: int = Field(16, ge=2, description="a cohort smaller than this waits for more records")
    max_cohort_age: int = Field(8, ge=0, description="drop cohorts more than this many versions back in the lineage")
    label_window_s: int = Field(86400, ge=1, description="a held-back record older than this is dropped")
    lease_ttl_ms: int = Field(10_000, ge=100, description="leader lease lifetime (renewed every third of it)")
    claim_idle_ms: int = Field(30_000, ge=0, description="reclaim entries idle this long from other consumers")
    keep_versions: int = Field(50, ge=1, description="retention: keep the newest N versions (and serving, its parent, "
                                                     "cohort sources, lineage roots, pins)")
    pin_versions: VersionNumbers = Field(default_factory=list,
                                         description="versions retention always keeps, every model (a,b or a list)")
    max_records_per_reconcile: int = Field(100_000, ge=1, description="most records one update uses (and buffers)")
    log_level: LogLevel = Field("info", description="logging level")
    device: str | None = Field(None, description="tinygrad device of the validation guard, in its DEV syntax, e.g. "
                                                 "CUDA (unset: tinygrad's default); checked with a kernel at start")
    disabled_clients: ClientNames = Field(default_factory=list,
                                          description="API clients whose feedback entries are dropped as invalid")

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, v: object) -> object:
        return v.lower() if isinstance(v, str) else v

    @model_validator(mode="after")
    def _poll_within_lease(self) -> WorkerSettings:
        """A blocking read must end well before the lease needs renewing (every ttl/3)."""
        if self.poll_ms * 3 > self.lease_ttl_ms:
            raise ValueError(f"poll_ms ({self.poll_ms}) must be at most lease_ttl_ms/3 ({self.lease_ttl_ms // 3})")
        return self

    def reconcile_config(self) -> ReconcileConfig:
        """The algorithm's knobs, as marketplace.reconcile takes them."""
        return ReconcileConfig(
            learning_rate=self.learning_rate, outlier=self.outlier, outlier_z=self.outlier_z,
            outlier_quantile=self.outlier_quantile, attribution=self.attribution, normalize=self.normalize,
            min_cohort=self.min_cohort, class_weights=self.class_weights, baseline=self.baseline, step=self.step,
            max_step=self.max_step, shrink=self.shrink, learn_groups=self.learn_groups,
            shrink_t=self.shrink_t, head_gradient=self.head_gradient, head_learning_rate=self.head_learning_rate,
            replay_learning_rate=self.head_replay_learning_rate)

    def update_config(self) -> UpdateConfig:
        """How the reconciled direction becomes a step (schedule, momentum)."""
        return UpdateConfig(momentum=self.momentum, lr_schedule=self.lr_schedule, lr_min_ratio=self.lr_min_ratio,
                            gap_scale=self.gap_scale)

    def manifest_record(self) -> dict[str, Any]:
        """The settings that shaped a version, for its manifest (no URLs or paths: they are deployment)."""
        keys = ("learning_rate", "outlier", "outlier_z", "outlier_quantile", "attribution", "normalize",
                "class_weights", "baseline", "step", "shrink", "shrink_t", "max_step", "head_gradient",
                "head_learning_rate", "head_replay_learning_rate", "head_damping", "learn_groups", "probe_scale",
                "vendors",
                "antithetic",
                "momentum", "lr_schedule", "lr_min_ratio", "gap_scale", "guard_tolerance", "guard_class_tolerance",
                "guard_reference", "guard_traffic", "guard_traffic_tolerance", "guard_traffic_gain_z",
                "guard_traffic_min", "guard_traffic_share", "guard_drift_z", "guard_traffic_max_age_s",
                "reseed_on_refusal", "min_cohort", "max_cohort_age", "min_records", "interval_s",
                "max_records_per_reconcile", "label_window_s", "consumer", "disabled_clients")
        return {k: getattr(self, k) for k in keys}

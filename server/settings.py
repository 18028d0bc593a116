"""Settings of an API replica: one pydantic-settings class, read from MPSERVE_* variables and CLI flags.

Every field is also a command-line flag (``--redis-url`` for ``redis_url``, see :mod:`server.main`);
flags override the environment, which overrides the defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.names import validate_model_name
from common.settings_types import ApiKeys, ClientNames, ModelNames
from marketplace.kernel_table import load_table
from redis_io.connect import RedisUrl
from redis_io.protocol import REPLAY_READ_MAX

LogLevel = Literal["critical", "error", "warning", "info", "debug"]


class ServerSettings(BaseSettings):
    """Everything an API replica needs to know; nothing else reads the environment."""

    model_config = SettingsConfigDict(env_prefix="MPSERVE_", extra="ignore", validate_default=True)

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on (0: any free port)")
    redis_url: RedisUrl = Field("redis://127.0.0.1:6379/0", description="Redis shared by replicas and the worker "
                              "(a Redis Cluster: redis+cluster://host:port,host:port)")
    store_dir: Path = Field(Path("./data/store"), description="root of the model store")
    default_model: str = Field("fashion", description="model used when a request names none")
    models: ModelNames = Field(default_factory=lambda: ["fashion"],
                              description="models this replica serves (default: just the default model)")
    max_batch: int = Field(256, ge=1, le=65536, description="largest engine batch, in inputs")
    max_wait_ms: float = Field(2.0, ge=0, le=1000, description="longest a request waits for others to batch with")
    label_window_s: int = Field(86400, ge=1, description="how long a prediction can still be labelled")
    admin_token: SecretStr | None = Field(None, description="bearer token of /admin/* (unset: admin is disabled)")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="largest request body accepted")
    max_inputs_per_request: int = Field(1024, ge=1, description="most inputs (or labels) in one request")
    poll_interval_s: float = Field(5.0, gt=0, description="version polling period (fallback to pub/sub events)")
    redis_timeout_s: float = Field(2.0, gt=0, description="longest a request waits on Redis before a 503")
    reconcile_timeout_s: float = Field(300.0, gt=0, description="longest POST /admin/reconcile waits")
    log_level: LogLevel = Field("info", description="logging level")
    device: str | None = Field(None, description="tinygrad device in its DEV syntax, e.g. CUDA or CUDA:PTX (unset: "
                                                 "tinygrad's default); checked with a kernel at start")
    seed_default: bool = Field(False, description="copy the shipped default model into an empty store at start")
    # API clients (server/access.py): unset api_keys leaves /predict and /label open
    api_keys: ApiKeys = Field(default_factory=dict, description="client API keys, 'client-a:secret1,client-b:secret2' "
                              "or a JSON object; when set, /predict and /label need one (X-API-Key or Bearer)")
    disabled_clients: ClientNames = Field(default_factory=list,
                                          description="clients whose keys get 403 (the worker drops their feedback)")
    rate_limit_per_s: float = Field(0.0, ge=0, description="requests per second per client, per replica (0: no limit)")
    rate_limit_burst: int = Field(10, ge=1, description="requests a client may send at once before the rate applies")
    learning: bool = Field(True, description="learn from traffic: vendor paths, records in Redis, labels accepted "
                                             "(off: a static replica serving the leader only, nothing recorded)")
    exploration: Literal["paired", "single"] = Field(
        "paired", description="paired: every input also runs through the leader, whose answer the user gets "
                              "(exploration invisible, 2x FLOPs); single: the user gets the perturbed path's answer")
    kernel_table: str = Field("shipped", min_length=1, description="tuned kernels (tinygrad BEAM results, "
                              "marketplace/kernel_table.py): 'shipped' (the package's table, used where it fits: the "
                              "same tinygrad, device kind and CPU thread count), 'off' (tinygrad's heuristics), or the "
                              "path of a table `mpserve tune-kernels` wrote")
    replay_share: float = Field(0.125, ge=0, le=1, description="share of predictions whose input is kept until "
                                "labelled, then moved to the replay stream: the worker's head learns from it and its "
                                "guard judges on it")
    replay_window_s: int = Field(3600, ge=1, description="how long a kept input waits for its label (Redis memory: "
                                                         "predictions/s x replay_share x input bytes x this)")
    replay_size: int = Field(512, ge=0, le=REPLAY_READ_MAX,
                             description="labelled inputs the replay stream keeps, newest (0: none; the guard then "
                                         "judges on its holdout only)")

    @field_validator("default_model")
    @classmethod
    def _valid_default(cls, v: str) -> str:
        return validate_model_name(v)

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, v: object) -> object:
        return v.lower() if isinstance(v, str) else v

    @field_validator("kernel_table")
    @classmethod
    def _readable_table(cls, v: str) -> str:
        """A table named by path is read now, so a wrong one stops the replica at start with the reason."""
        if v not in ("shipped", "off"):
            load_table(Path(v))
        return v

    @field_validator("admin_token")
    @classmethod
    def _nonempty_token(cls, v: SecretStr | None) -> SecretStr | None:
        """An empty token would be a door without a lock: treat it as unset (admin disabled)."""
        return v if v is not None and v.get_secret_value() else None

    @model_validator(mode="after")
    def _default_is_served(self) -> ServerSettings:
        if "models" not in self.model_fields_set:
            self.models = [self.default_model]
        if self.default_model not in self.models:
            raise ValueError(f"default_model {self.default_model!r} is not among models {self.models}")
        return self

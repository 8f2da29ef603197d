"""Settings: defaults < YAML file (`--config` or SEGMENT_CONFIG) < SEGMENT_* env vars.

Every setting lives in a section, so its env name is `SEGMENT_<SECTION>_<NAME>`, for
example `SEGMENT_KAFKA_BOOTSTRAP_SERVERS` or `SEGMENT_MODEL_N_CLUSTERS`.
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

ENV_PREFIX = "SEGMENT_"
CONFIG_ENV = "SEGMENT_CONFIG"
DEFAULT_YAML = Path(__file__).with_name("default.yaml")

_yaml_file: ContextVar[Path | None] = ContextVar("yaml_file", default=None)

Positive = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KafkaSettings(_Section):
    bootstrap_servers: str = "localhost:9092"
    group_id: str = "segment-worker"
    client_id: str = "segment-worker"
    clickstream_topic: str = "clickstream"
    purchases_topic: str = "purchases"
    dlq_topic: str = "segment-events-dlq"
    changes_topic: str = "segment-changes"
    lifecycle_topic: str = "segment-lifecycle"
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    max_poll_records: Positive = 2000
    poll_timeout_ms: Positive = 500
    fetch_max_wait_ms: Positive = 10
    align_max_wait_ms: Annotated[int, Field(ge=0)] = 5000  # 0: no event-time alignment
    purchases_wait_ms: Annotated[int, Field(ge=0)] = 1000  # 0: purchases do not wait for views
    session_timeout_ms: Positive = 10_000
    heartbeat_interval_ms: Positive = 3_000
    max_poll_interval_ms: Positive = 300_000
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    @field_validator("bootstrap_servers")
    @classmethod
    def _host_ports(cls, value: str) -> str:
        for server in value.split(","):
            host, _, port = server.strip().rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"expected host:port[,host:port...], got {value!r}")
        return value

    @property
    def input_topics(self) -> tuple[str, str]:
        return (self.clickstream_topic, self.purchases_topic)


class RedisSettings(_Section):
    url: str = "redis://localhost:6379/0"
    key_prefix: str = "seg"
    profile_ttl_days: PositiveFloat = 90.0
    socket_timeout_s: PositiveFloat = 5.0
    ssl_ca_file: str | None = None
    ssl_cert_file: str | None = None
    ssl_key_file: str | None = None

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @field_validator("ssl_ca_file", "ssl_cert_file", "ssl_key_file")
    @classmethod
    def _readable(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).is_file():
            raise ValueError(f"no such file: {value}")
        return value

    @model_validator(mode="after")
    def _tls_files(self) -> RedisSettings:
        if (self.ssl_cert_file is None) != (self.ssl_key_file is None):
            raise ValueError("ssl_cert_file and ssl_key_file go together")
        tls = self.ssl_ca_file or self.ssl_cert_file
        if tls and not self.url.startswith("rediss://"):
            raise ValueError("ssl_* files need a rediss:// url")
        return self


class ProfileSettings(_Section):
    half_life_days: PositiveFloat = 7.0
    session_gap_minutes: PositiveFloat = 30.0
    top_categories: Positive = 5
    recency_cap_days: PositiveFloat = 30.0
    # tenure says whether a profile is new, not how old: past one half-life of history
    # the behaviour features speak, and an uncapped tenure moves every user for a month
    tenure_cap_days: PositiveFloat = 7.0
    cache_size: Positive = 200_000
    dedupe_window: Annotated[int, Field(ge=0, le=256)] = 8


Share = Annotated[float, Field(gt=0, lt=1)]


class ModelSettings(_Section):
    algorithm: Literal["kmeans"] = "kmeans"
    n_clusters: Annotated[int, Field(ge=2, le=64)] = 5  # at the first seeding
    max_clusters: Annotated[int, Field(ge=2, le=64)] = 12  # new segments stop here
    learning_rate: Share = 0.01
    warmup_users: Annotated[int, Field(ge=10)] = 500
    # each active user is learned once per this much event time (worker/learning.py)
    learn_window_minutes: PositiveFloat = 120.0
    learn_window_users: Annotated[int, Field(ge=1)] = 5000  # a sample of the busiest windows
    seed: int = 42
    checkpoint_interval_s: PositiveFloat = 30.0
    # and, once settled, each time it has learned this much event time past its last
    # publication: a backlog read at full speed covers days of event time in one interval
    publish_every_hours: PositiveFloat = 6.0
    # membership: a user moves only when another centre is this much closer (relative)
    switch_margin: Annotated[float, Field(ge=0, lt=1)] = 0.9
    adopt_days: Annotated[float, Field(ge=0)] = 7.0  # an added segment takes users marginless
    # drift: the detectors' false-alarm bounds and the segment-share (PSI) check
    fit_drift_delta: Share = 0.002
    feature_drift_delta: Share = 1e-5
    event_drift_threshold: PositiveFloat = 8.0
    psi_window: Annotated[int, Field(ge=100)] = 2000
    psi_threshold: PositiveFloat = 0.2
    # adaptation: from the last `reservoir_size` profiles learned, `adapt_after` of them
    # after a detection
    adaptation: bool = True  # off: the segments stay as seeded (detectors still report)
    reservoir_size: Annotated[int, Field(ge=50, le=20_000)] = 2000
    adapt_after: Positive = 300
    refit_days: PositiveFloat = 7.0  # and, drift or not, this long after the last (event time)
    # after seeding, refits keep the number of segments for this long (event time): a
    # cold-started population's profiles are still growing (3 profile half-lives)
    settle_days: Annotated[float, Field(ge=0)] = 21.0
    new_segment_share: Share = 0.04  # a new group needs it; an id anchored under it may retire
    new_segment_growth: Annotated[float, Field(gt=1)] = 3.0
    growth_looks: Annotated[int, Field(ge=0)] = 8  # after a drift's refit that added none
    merge_distance: PositiveFloat = 0.75
    redraw_gain: Share = 0.1  # a refit starts over only when that fits this much better

    @model_validator(mode="after")
    def _bounds(self) -> ModelSettings:
        if self.n_clusters > self.max_clusters:
            raise ValueError("n_clusters must not exceed max_clusters")
        if self.warmup_users > self.reservoir_size:
            raise ValueError("warmup_users must not exceed reservoir_size (warm-up fills it)")
        if self.adapt_after > self.reservoir_size:
            raise ValueError("adapt_after must not exceed reservoir_size")
        return self


class DecodeSettings(_Section):
    max_event_bytes: Positive = 64 * 1024


class MetricsSettings(_Section):
    host: str = "0.0.0.0"
    port: Annotated[int, Field(ge=0, le=65535)] = 9108


class WorkerSettings(_Section):
    retry_initial_s: PositiveFloat = 0.5
    retry_max_s: PositiveFloat = 30.0
    shutdown_grace_s: PositiveFloat = 30.0
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"


class Settings(BaseSettings):
    """All settings of the worker, one section per stage."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="_",
        env_nested_max_split=1,
        extra="forbid",
        frozen=True,
    )

    kafka: KafkaSettings = KafkaSettings()
    redis: RedisSettings = RedisSettings()
    profile: ProfileSettings = ProfileSettings()
    model: ModelSettings = ModelSettings()
    decode: DecodeSettings = DecodeSettings()
    metrics: MetricsSettings = MetricsSettings()
    worker: WorkerSettings = WorkerSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        yaml_file = _yaml_file.get()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if yaml_file:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
        return tuple(sources)


class SettingsError(ValueError):
    """Settings that cannot start the worker; the message names each bad setting."""


def _env_name(loc: tuple[str | int, ...]) -> str:
    return ENV_PREFIX + "_".join(str(part) for part in loc).upper()


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Load and validate settings, turning pydantic's errors into named-setting messages.

    The YAML file is `config_file`, else the one SEGMENT_CONFIG names, else none.
    """
    if config_file is None and os.environ.get(CONFIG_ENV):
        config_file = Path(os.environ[CONFIG_ENV])
    if config_file is not None and not config_file.is_file():
        raise SettingsError(f"config file {config_file} does not exist")
    token = _yaml_file.set(config_file)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            name = ".".join(str(part) for part in error["loc"])
            lines.append(f"invalid setting {name} ({_env_name(error['loc'])}): {error['msg']}")
        raise SettingsError("\n".join(lines)) from None
    finally:
        _yaml_file.reset(token)


def to_env(settings: Settings) -> dict[str, str]:
    """The settings as SEGMENT_* variables, for starting a worker process with them."""
    env = {}
    for section, values in settings.model_dump().items():
        for name, value in values.items():
            if value is not None:
                env[_env_name((section, name))] = str(value)
    return env

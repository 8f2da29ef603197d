"""Settings precedence (defaults < YAML < env) and errors that name the setting."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from config.settings import DEFAULT_YAML, Settings, SettingsError, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("SEGMENT_"):
            monkeypatch.delenv(name)


def test_defaults() -> None:
    s = load_settings()
    assert s.kafka.bootstrap_servers == "localhost:9092"
    assert s.metrics.port == 9108
    assert s.redis.key_prefix == "seg"


def test_yaml_overrides_defaults_and_env_overrides_yaml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "worker.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "kafka": {"bootstrap_servers": "yaml:9092", "group_id": "from-yaml"},
                "model": {"n_clusters": 8},
            }
        )
    )
    monkeypatch.setenv("SEGMENT_KAFKA_BOOTSTRAP_SERVERS", "env:9092")
    monkeypatch.setenv("SEGMENT_REDIS_URL", "redis://env:6379/1")
    s = load_settings(config)
    assert s.kafka.bootstrap_servers == "env:9092"  # env beats YAML
    assert s.kafka.group_id == "from-yaml"  # YAML beats default, same section
    assert s.model.n_clusters == 8
    assert s.redis.url == "redis://env:6379/1"
    assert s.profile.half_life_days == 7.0  # untouched default


def test_config_file_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "w.yaml"
    config.write_text("profile:\n  cache_size: 1234\n")
    monkeypatch.setenv("SEGMENT_CONFIG", str(config))
    assert load_settings().profile.cache_size == 1234


@pytest.mark.parametrize(
    ("env", "value", "named"),
    [
        ("SEGMENT_MODEL_N_CLUSTERS", "1", "model.n_clusters (SEGMENT_MODEL_N_CLUSTERS)"),
        ("SEGMENT_KAFKA_BOOTSTRAP_SERVERS", "no-port", "kafka.bootstrap_servers"),
        ("SEGMENT_REDIS_URL", "http://x", "redis.url"),
        ("SEGMENT_METRICS_PORT", "99999", "metrics.port"),
        ("SEGMENT_PROFILE_HALF_LIFE_DAYS", "-3", "profile.half_life_days"),
    ],
)
def test_bad_env_setting_is_named(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, named: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(SettingsError, match=named.replace("(", r"\(").replace(")", r"\)")):
        load_settings()


def test_unknown_yaml_setting_is_named(tmp_path: Path) -> None:
    config = tmp_path / "w.yaml"
    config.write_text("model:\n  n_cluster: 5\n")
    with pytest.raises(SettingsError, match=r"model\.n_cluster .*Extra inputs"):
        load_settings(config)


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml")


def test_default_yaml_is_the_defaults() -> None:
    """config/default.yaml documents every setting with its default value."""
    assert yaml.safe_load(DEFAULT_YAML.read_text()) == Settings().model_dump(mode="json")


def test_readme_documents_every_setting() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for section, model in Settings():
        for name, default in model:
            env = f"SEGMENT_{section.upper()}_{name.upper()}"
            assert (
                f"| `{section}.{name}` | `{'' if default is None else default}` | `{env}` |"
                in readme
            )

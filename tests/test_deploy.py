"""The production stack's files, checked against each other and against real tools.

There is no Docker engine here, so docker-compose.yml is validated by structure and
cross-references; Prometheus config, alert rules and their unit tests go through the real
`promtool`; the dashboard's queries run on a real Prometheus scraping a real worker.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from conftest import wait_for

from config.settings import Settings, load_settings
from worker.embedded import free_port
from worker.generator import generate
from worker.metrics import Metrics
from worker.replay import produce
from worker.source import ensure_topics

ROOT = Path(__file__).parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
PROMETHEUS = ROOT / "config" / "prometheus"
DASHBOARD = orjson.loads((ROOT / "config/grafana/dashboards/segment-worker.json").read_bytes())
promtool = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(promtool is None, reason="promtool not installed")


def test_compose_has_the_whole_stack() -> None:
    assert set(SERVICES) == {"kafka", "kafka-topics", "redis", "worker", "prometheus", "grafana"}
    kafka_env = SERVICES["kafka"]["environment"]
    assert "controller" in kafka_env["KAFKA_PROCESS_ROLES"]  # KRaft, no ZooKeeper
    assert SERVICES["kafka"]["image"].startswith("apache/kafka:")
    defaults = Settings().kafka
    script = SERVICES["kafka-topics"]["command"][0]
    for topic in (*defaults.input_topics, defaults.dlq_topic, defaults.changes_topic):
        assert topic in script
    assert SERVICES["worker"]["build"] == "."


def test_worker_env_names_settings_the_worker_really_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    env = SERVICES["worker"]["environment"]
    fields = {
        f"SEGMENT_{section.upper()}_{name.upper()}"
        for section, model in Settings()
        for name, _ in model
    }
    assert set(env) <= fields, set(env) - fields
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    settings = load_settings()
    host, port = settings.kafka.bootstrap_servers.split(":")
    assert (
        host == "kafka"
        and f"PLAINTEXT://{host}:{port}"
        in SERVICES["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    )
    assert settings.redis.url.startswith("redis://redis:6379")
    assert f"{settings.metrics.port}:{settings.metrics.port}" in SERVICES["worker"]["ports"]


def test_mounted_files_exist_and_prometheus_scrapes_the_worker() -> None:
    for service in SERVICES.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), volume
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    port = SERVICES["worker"]["environment"]["SEGMENT_METRICS_PORT"]
    assert job["static_configs"][0]["targets"] == [f"worker:{port}"]
    assert job["job_name"] == "segment-worker"
    datasource = yaml.safe_load(
        (ROOT / "config/grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"][0]
    assert (
        datasource["url"] == "http://prometheus:9090"
        and "9090:9090" in SERVICES["prometheus"]["ports"]
    )
    provider = yaml.safe_load(
        (ROOT / "config/grafana/provisioning/dashboards/segment-worker.yml").read_text()
    )["providers"][0]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in SERVICES["grafana"]["volumes"]}
    assert (ROOT / mounts[provider["options"]["path"]] / "segment-worker.json").is_file()


def test_dockerfile_is_slim_non_root_and_health_checked() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in text
    assert "USER segment" in text and "useradd" in text
    assert "HEALTHCHECK" in text and "/healthz" in text
    assert "EXPOSE 9108" in text


def test_dashboard_is_provisionable() -> None:
    assert DASHBOARD["uid"] == "segment-worker"
    titles = {p["title"] for p in DASHBOARD["panels"]}
    assert {"Events applied / s by type", "Consumer lag", "Users per segment"} <= titles
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    for p in DASHBOARD["panels"]:
        assert p["datasource"]["uid"] == "prometheus" and p["targets"]


def test_dashboard_charts_every_metric_the_worker_exports() -> None:
    queries = " ".join(t["expr"] for p in DASHBOARD["panels"] for t in p["targets"])
    exported = {family.name for family in Metrics().registry.collect()}
    assert {name for name in exported if name not in queries} == set()


def test_dashboard_does_not_add_up_what_every_worker_reports_alike() -> None:
    """Segment sizes and shares come from Redis, so each worker reports the whole shop's."""
    for p in DASHBOARD["panels"]:
        for target in p["targets"]:
            for gauge in ("segmentation_segment_users", "segmentation_segment_share"):
                assert f"sum by (segment) ({gauge})" not in target["expr"], p["title"]


@needs_promtool
@pytest.mark.parametrize(
    "args",
    [
        ["check", "config", "prometheus.yml"],
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
    ],
)
def test_promtool(args: list[str]) -> None:
    ran = subprocess.run([promtool, *args], cwd=PROMETHEUS, capture_output=True, text=True)  # type: ignore[list-item]
    assert ran.returncode == 0, ran.stdout + ran.stderr


def _query(port: int, expr: str) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as response:
        result: dict[str, Any] = orjson.loads(response.read())
    return result


@needs_promtool
@pytest.mark.integration
def test_every_panel_shows_data_on_a_real_prometheus(
    settings: Settings, start_worker, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    prometheus_bin = shutil.which("prometheus")
    if prometheus_bin is None:
        pytest.skip("prometheus not installed")
    ensure_topics(settings.kafka, partitions=2)
    running = start_worker(settings, idle=None)
    stop = threading.Event()
    shop = generate(users=300, events=20_000, seed=31)
    producer = threading.Thread(
        target=produce, args=(shop.events, settings), kwargs={"rate": 800, "stop": stop}
    )
    producer.start()
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(PROMETHEUS / "alerts.yml")],
                "scrape_configs": [
                    {
                        "job_name": "segment-worker",
                        "static_configs": [
                            {"targets": [f"127.0.0.1:{running.worker.health.port}"]}
                        ],
                    }
                ],
            }
        )
    )
    server = subprocess.Popen(
        [
            prometheus_bin,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def flowing() -> bool:
            try:
                result = _query(port, "sum(rate(segmentation_events_total[15s])) > 0")
            except OSError:
                return False
            return bool(result["data"]["result"]) and bool(
                _query(port, "max(segmentation_model_version) > 0")["data"]["result"]
            )

        wait_for(flowing, timeout=90, what="Prometheus to see events flowing")
        for panel in DASHBOARD["panels"]:
            for target in panel["targets"]:
                expr = target["expr"].replace("$__rate_interval", "15s")
                result = _query(port, expr)
                assert result["status"] == "success", expr
                assert result["data"]["result"], f"panel {panel['title']!r}: no data for {expr}"
        annotation = DASHBOARD["annotations"]["list"][1]["expr"]
        assert _query(port, annotation)["status"] == "success"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/rules", timeout=10) as r:
            groups = orjson.loads(r.read())["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        assert len(rules) == 7 and all(rule["health"] == "ok" for rule in rules)
    finally:
        stop.set()
        producer.join(30)
        server.terminate()
        server.wait(10)

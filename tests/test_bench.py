"""`segment-worker bench` on a small run: every figure present, each plausible.

The full run (500k events over 50k users) is `segment-worker bench`; its figures are in
the README. Timed assertions have no place here: only consistency is checked.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import orjson
import pytest
import redis
from conftest import wait_for, worker_env
from kafka import KafkaAdminClient

from config.settings import ModelSettings, Settings
from worker.bench import Sample, histogram_quantile, settle_days_within, sustained
from worker.profiles import DAY_MS
from worker.source import kafka_client_config

CLI = [sys.executable, "-m", "worker"]
BENCH = [*CLI, "bench"]


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    # 10 observations ≤ 0.1 s, 10 more in (0.1, 0.5]: the median is the end of the first
    # bucket, the 75th percentile half way through the second
    buckets = {0.1: 10.0, 0.5: 20.0, float("inf"): 20.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.75, buckets) == pytest.approx(0.3)
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.05)


def test_the_latency_stage_model_settles_within_the_warm_up() -> None:
    """A settling model places users without the switch margin: no steady state. The
    stage's model settles half way through a warm-up shorter than `settle_days`."""
    ten_days = [{"timestamp": 0}, {"timestamp": int(10 * DAY_MS)}]
    assert settle_days_within(ten_days, 21.0) == pytest.approx(5.0)
    seventy_days = [{"timestamp": 0}, {"timestamp": int(70 * DAY_MS)}]
    assert settle_days_within(seventy_days, 21.0) == 21.0


def test_the_sustained_rate_spans_two_scrapes_even_when_a_run_is_quick() -> None:
    """From 10 % to 90 % of 1,000 events between two scrapes: the scrape before 10 % and
    the one at 90 % bound the stretch (the first at 10 % and at 90 % would be the same)."""
    samples = [Sample(t, [n], [0.0], [True]) for t, n in ((0.0, 0), (0.25, 50), (0.5, 1000))]
    start, end = sustained(samples, 1000)
    assert (start.at, end.at) == (0.25, 0.5)
    # two workers: the events of both count
    steady = [Sample(t / 4, [min(125.0 * t, 500)] * 2, [0.0] * 2, [True, False]) for t in range(6)]
    assert [s.events for s in sustained(steady, 1000)] == [0.0, 1000]
    with pytest.raises(RuntimeError, match="too few"):
        sustained([Sample(0.0, [1000], [0.0], [True])], 1000)


@pytest.mark.integration
def test_bench_reports_every_figure() -> None:
    ran = subprocess.run(
        [*BENCH, "--events", "20000", "--users", "2000", "--latency-seconds", "5", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    figures = orjson.loads(ran.stdout)
    full, latency, batch, scale = (
        figures["full_speed"],
        figures["latency"],
        figures["batch_alternative"],
        figures["scale_out"],
    )
    assert figures["raw_ceiling_events_per_s"] > full["events_per_s"] > 0
    assert full["ratio_to_raw"] == pytest.approx(
        full["events_per_s"] / figures["raw_ceiling_events_per_s"], abs=1e-3
    )
    assert full["cpu_s_per_1k_events"] > 0 and full["peak_rss_mb"][0] > 50
    assert 0 < latency["p50_ms"] <= latency["p95_ms"] <= latency["p99_ms"]
    assert 0 < latency["batch_p50_ms"] <= latency["batch_p99_ms"]
    assert 0 < latency["poll_wait_p50_ms"] < 500  # under the poll timeout: records came
    assert set(latency["cores_while_paced"]) == {"broker", "redis", "worker", "load_generator"}
    assert 0 < latency["cores_while_paced"]["worker"] <= 1.5  # one loop, a network thread
    assert latency["offered_events_per_s"] == round(full["events_per_s"] / 2)
    assert latency["events"] == latency["warm_up_events"] > 0
    # measured on a settled model: it settles half way through the unmeasured warm-up,
    # or after production's 21 days if that is sooner
    assert 0 < latency["settle_days"] <= ModelSettings().settle_days
    assert 50 < figures["redis_bytes_per_user"] < 100_000
    # where the bytes go: every part is there, and they add up (each rounded alone)
    parts = figures["redis_bytes_per_user_by_key"]
    assert set(parts) == {"user_hash", "profile", "membership"} and min(parts.values()) > 0
    assert abs(sum(parts.values()) - figures["redis_bytes_per_user"]) <= 2
    assert batch["users"] == figures["users"]
    assert 0 < batch["ari_streaming_vs_personas"] <= 1 and 0 < batch["ari_batch_vs_personas"] <= 1
    assert batch["wall_s"] >= batch["fit_s"]
    assert scale["workers"] == 2 and len(scale["peak_rss_mb"]) == 2
    assert [w["role"] for w in full["per_worker"]] == ["trainer"]
    # one worker trains; both take a share of the events and report their own CPU
    assert sorted(w["role"] for w in scale["per_worker"]) == ["follower", "trainer"]
    assert sum(w["events_share"] for w in scale["per_worker"]) == pytest.approx(1, abs=0.01)
    assert all(w["events_share"] > 0 and w["cpu_s_per_1k_events"] > 0 for w in scale["per_worker"])
    assert set(scale["cpu_s_whole_run"]) == {"broker", "redis", "workers"}


@pytest.mark.integration
def test_bench_on_given_servers_leaves_them_as_it_found_them(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """`--given` may point at shared servers: the run's keys, topics and groups go at the
    end, and its workers write to topics of their own (not the settings' lifecycle topic,
    which other services read)."""
    redis_client.set("someone-elses", "kept")
    admin = KafkaAdminClient(**kafka_client_config(settings.kafka))
    topics_before = set(admin.list_topics())
    ran = subprocess.run(
        [*BENCH, "--given", "--events", "20000", "--users", "2000", "--latency-seconds", "5"],
        env=worker_env(settings),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "two workers, sustained" in ran.stdout  # the table
    assert redis_client.keys("*") == [b"someone-elses"]
    assert set(admin.list_topics()) == topics_before
    admin.close()


@pytest.mark.integration
@pytest.mark.parametrize(
    ("command", "writes"),
    [
        ([*BENCH, "--events", "20000", "--users", "2000"], "bench*:profile:*"),
        ([*CLI, "evaluate", "--users", "1000", "--events", "60000"], "eval-*:profile:*"),
    ],
    ids=["bench", "evaluate"],
)
def test_a_run_interrupted_mid_stage_still_cleans_up(
    settings: Settings, redis_client: redis.Redis, command: list[str], writes: str
) -> None:
    """Stopped while its first worker writes (SIGTERM; Ctrl-C takes the same path): a
    `--given` bench or evaluation stops its workers, then its keys and topics go, as at
    a normal end."""
    admin = KafkaAdminClient(**kafka_client_config(settings.kafka))
    topics_before = set(admin.list_topics())
    run = subprocess.Popen(
        [*command, "--given"],
        env=worker_env(settings),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: redis_client.keys(writes), 120, "the worker's first writes")
        run.send_signal(signal.SIGTERM)  # to the run alone: its workers stop by its hand
        _, stderr = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode != 0, "the run was interrupted"
    assert redis_client.keys("*") == [], stderr.decode()[-2000:]
    assert set(admin.list_topics()) == topics_before
    admin.close()

"""Redis going away, and the broker restarting, mid-stream: the worker pauses, says so
on /readyz, and loses nothing.

The suite holds each down for 3 s; OUTAGE_SECONDS=20 (`make outage`) for the full version.
The broker that restarts is Tansu storing to S3 (moto's S3 server on loopback): with the
default in-memory storage a restart would be a new, empty cluster.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import boto3
import pytest
import redis
from conftest import RunningWorker, applied, differing, profiles, wait_for
from kafka import KafkaConsumer, TopicPartition

from config.settings import Settings
from worker.embedded import EmbeddedBroker, EmbeddedRedis, free_port
from worker.generator import Shop, generate
from worker.replay import produce
from worker.sink import RedisStore
from worker.source import ensure_topics, kafka_client_config

pytestmark = pytest.mark.integration
OUTAGE_SECONDS = float(os.environ.get("OUTAGE_SECONDS", "3"))


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2):
            return True
    except urllib.error.HTTPError:
        return False


def with_redis(settings: Settings, url: str, prefix: str, group: str) -> Settings:
    return settings.model_copy(
        update={
            "redis": settings.redis.model_copy(update={"url": url, "key_prefix": prefix}),
            "kafka": settings.kafka.model_copy(update={"group_id": group, "max_poll_records": 300}),
        }
    )


def applied_exactly_once(
    running: RunningWorker, client: redis.Redis, shop: Shop, after: str
) -> None:
    """Wait for every event to be applied, stop the worker, and check its profiles equal
    the uninterrupted reference run's (prefix `ref`) field for field."""
    wait_for(
        lambda: applied(client, "seg") == len(shop.events),
        timeout=180,
        what=f"every event applied after {after}",
    )
    running.stop.set()
    running.join()
    users = set(shop.truth)
    expected, got = profiles(client, "ref", users), profiles(client, "seg", users)
    assert set(got) == users
    assert not differing(expected, got)


@pytest.fixture
def durable_broker() -> Iterator[EmbeddedBroker]:
    """A Tansu broker whose topics, records and committed offsets survive a restart."""
    port = free_port()
    s3 = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    aws = {
        "AWS_ACCESS_KEY_ID": "segment",
        "AWS_SECRET_ACCESS_KEY": "segment",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT": f"http://127.0.0.1:{port}",
        "AWS_ALLOW_HTTP": "true",
    }
    wait_for(lambda: s3_answers(aws["AWS_ENDPOINT"]), what="the S3 server")
    boto3.client(
        "s3",
        endpoint_url=aws["AWS_ENDPOINT"],
        region_name="us-east-1",
        aws_access_key_id="segment",
        aws_secret_access_key="segment",
    ).create_bucket(Bucket="tansu")
    try:
        with EmbeddedBroker(storage="s3://tansu/", env=aws) as broker:
            yield broker
    finally:
        s3.terminate()
        s3.wait()


def s3_answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def committed(settings: Settings, partitions: int) -> int:
    """The group's committed offsets, summed over the input partitions."""
    consumer = KafkaConsumer(
        **kafka_client_config(settings.kafka), group_id=settings.kafka.group_id
    )
    try:
        return sum(
            consumer.committed(TopicPartition(topic, p)) or 0
            for topic in settings.kafka.input_topics
            for p in range(partitions)
        )
    finally:
        consumer.close()


def test_redis_outage_pauses_then_resumes_exactly(settings: Settings, start_worker) -> None:  # type: ignore[no-untyped-def]
    ensure_topics(settings.kafka, partitions=3)
    shop = generate(users=400, events=8000, seed=51)
    produce(shop.events, settings)
    with EmbeddedRedis(persistent=True) as server:
        client = redis.Redis.from_url(server.url)
        start_worker(with_redis(settings, server.url, "ref", "reference")).join()

        running = start_worker(with_redis(settings, server.url, "seg", "outage"), idle=None)
        port, registry = running.worker.health.port, running.worker.metrics.registry
        wait_for(lambda: applied(client, "seg") > 2000, timeout=120, what="progress")
        server.stop()
        down_at = time.monotonic()
        wait_for(lambda: not ready(port), what="/readyz to report the outage")

        def redis_errors() -> float:  # whichever call met the outage: read or write
            return sum(
                registry.get_sample_value("segmentation_redis_errors_total", {"operation": op}) or 0
                for op in RedisStore.OPERATIONS
            )

        wait_for(lambda: redis_errors() >= 3, what="the worker to retry Redis")
        # the outage itself is the scenario: hold Redis down for the stated time
        time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - down_at)))
        assert running.thread.is_alive() and not ready(port)
        server.start()
        wait_for(lambda: ready(port), timeout=60, what="/readyz to recover")
        applied_exactly_once(running, client, shop, "the outage")


def test_broker_crash_and_restart_mid_stream_resumes_exactly(
    settings: Settings, redis_client: redis.Redis, durable_broker: EmbeddedBroker, start_worker
) -> None:  # type: ignore[no-untyped-def]
    kafka = settings.kafka.model_copy(
        update={
            "bootstrap_servers": durable_broker.bootstrap_servers,
            "max_poll_records": 300,
            # Tansu reading from S3 answers a fetch with nothing if it cannot read the
            # records within the fetch wait; a real broker returns what it has at once
            "fetch_max_wait_ms": 500,
        }
    )
    on_durable = settings.model_copy(update={"kafka": kafka})
    ensure_topics(kafka, partitions=2)
    shop = generate(users=400, events=8000, seed=52)
    produce(shop.events, on_durable)
    ensure_topics(settings.kafka, partitions=2)  # the reference run, on the suite's broker
    produce(shop.events, settings)
    start_worker(with_redis(settings, settings.redis.url, "ref", "reference")).join()

    restarted = with_redis(on_durable, settings.redis.url, "seg", "restart")
    running = start_worker(restarted, idle=None)
    wait_for(lambda: applied(redis_client, "seg") > 0, timeout=120, what="progress")
    durable_broker.kill()  # a crash: what it acknowledged is in S3, nothing else
    # the outage itself is the scenario: hold the broker down for the stated time
    time.sleep(OUTAGE_SECONDS)
    assert running.thread.is_alive()
    assert applied(redis_client, "seg") < len(shop.events), "stopped too late to prove anything"
    durable_broker.start()
    applied_exactly_once(running, redis_client, shop, "the restart")
    assert committed(restarted, 2) == len(shop.events)  # to the restarted broker

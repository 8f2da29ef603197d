"""The commands as an operator runs them: separate processes, settings from env vars."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import redis
from conftest import wait_for, worker_env

from config.settings import Settings
from schemas.reader import SegmentReader
from worker.embedded import EmbeddedRedis, free_port
from worker.features import FEATURES
from worker.generator import event_ms, generate, iso
from worker.source import ensure_topics

pytestmark = pytest.mark.integration
CLI = [sys.executable, "-m", "worker"]


def test_generate_to_kafka_then_run_until_idle(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    env = worker_env(settings)
    truth = tmp_path / "truth.csv"
    generated = subprocess.run(
        [*CLI, "generate", "--users", "300", "--events", "5000", "--kafka", "--truth", str(truth)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert generated.returncode == 0, generated.stderr
    users = [line.split(",")[0] for line in truth.read_text().splitlines()[1:]]
    assert 250 <= len(users) <= 300  # users whose first event falls after the cut never appear

    ran = subprocess.run(
        [*CLI, "run", "--stop-after-idle", "3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ran.returncode == 0, ran.stderr
    assert "Traceback" not in ran.stderr
    # a backlog batch can span a week of event time: the first publication may be a refit's
    assert re.search(r"published model v\d+ revision", ran.stderr)
    assert "5000 events applied, 0 dead-lettered, 0 skipped" in ran.stderr
    reader = SegmentReader(redis_client)
    assert all(reader.get(user) is not None for user in users)

    stored = reader.get(users[0])
    assert stored is not None
    explained = subprocess.run(
        [*CLI, "explain", users[0]], env=env, capture_output=True, text=True, timeout=60
    )
    assert explained.returncode == 0, explained.stderr
    assert f"stored: {stored.segment})" in explained.stdout
    assert all(feature in explained.stdout for feature in FEATURES)
    nobody = subprocess.run(
        [*CLI, "explain", "nobody"], env=env, capture_output=True, text=True, timeout=60
    )
    assert nobody.returncode == 1 and "no profile stored for 'nobody'" in nobody.stderr


def test_generate_to_file_is_reproducible(tmp_path: Path) -> None:
    outputs = []
    for name in ("a.jsonl", "b.jsonl"):
        out = tmp_path / name
        subprocess.run(
            [*CLI, "generate", "--users", "50", "--events", "500", "--out", str(out)],
            check=True,
            capture_output=True,
            timeout=60,
        )
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
    assert len(outputs[0].splitlines()) == 500


def test_generate_writes_the_ground_truth_of_the_schedule_it_was_given(tmp_path: Path) -> None:
    """Personas and each drift's start: what `evaluate` scores against, for a shop sent
    elsewhere (`--sale-at` moves the sale, `--drift` keeps only the drifts named)."""
    out, truth, onsets = tmp_path / "shop.jsonl", tmp_path / "truth.csv", tmp_path / "on.json"
    options = [
        "--truth",
        str(truth),
        "--onsets",
        str(onsets),
        "--drift",
        "sale",
        "--sale-at",
        "0.3",
    ]
    subprocess.run(
        [*CLI, "generate", "--users", "300", "--events", "6000", "--out", str(out), *options],
        check=True,
        capture_output=True,
        timeout=60,
    )
    shop = generate(300, 6000, seed=7, drifts=("sale",), starts={"sale": 0.3})
    assert [orjson.loads(line) for line in out.read_bytes().splitlines()] == shop.events
    assert orjson.loads(onsets.read_bytes()) == {
        "sale": {"timestamp": shop.drifts["sale"], "time": iso(shop.drifts["sale"])}
    }
    first, last = event_ms(shop.events[0]), event_ms(shop.events[-1])
    assert 0.28 < (shop.drifts["sale"] - first) / (last - first) < 0.32
    rows = truth.read_text().splitlines()
    assert rows[0] == "user_id,persona" and len(rows) == 1 + len(shop.truth)
    assert "new_visitor" not in truth.read_text()  # only the sale was scheduled


@pytest.mark.parametrize(
    ("name", "value", "named"),
    [
        ("SEGMENT_MODEL_N_CLUSTERS", "1", "model.n_clusters"),
        ("SEGMENT_KAFKA_BOOTSTRAP_SERVERS", "nonsense", "kafka.bootstrap_servers"),
    ],
)
def test_bad_setting_fails_at_start_naming_it(
    settings: Settings, name: str, value: str, named: str
) -> None:
    ran = subprocess.run(
        [*CLI, "run"],
        env=worker_env(settings, **{name: value}),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == 2
    assert named in ran.stdout + ran.stderr and name in ran.stdout + ran.stderr
    assert "Traceback" not in ran.stdout + ran.stderr


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        (["--cut", "1"], ("--cut", "--replay")),  # a cut is a way of replaying
        (["--stationary", "--drift", "sale"], ("--drift", "stationary")),
        (["--drift", "flash_crash"], ("--drift", "flash_crash")),  # not in the schedule
        (["--sale-at", "1.2"], ("--sale-at", "1.2", "timeline")),  # after the shop's end
        (["--new-persona-at", "0"], ("--new-persona-at", "0.0", "timeline")),
        (["--users", "300"], ("--users", "warmup_users")),  # too few for the model to seed
    ],
)
def test_evaluate_refuses_options_that_contradict_naming_them(
    arguments: list[str], named: tuple[str, ...]
) -> None:
    ran = subprocess.run([*CLI, "evaluate", *arguments], capture_output=True, text=True, timeout=60)
    assert ran.returncode == 2
    assert all(word in ran.stdout + ran.stderr for word in named), ran.stdout + ran.stderr
    assert "Traceback" not in ran.stdout + ran.stderr


def test_redis_down_at_start_is_retried_not_a_crash(settings: Settings, tmp_path: Path) -> None:
    ensure_topics(settings.kafka, partitions=1)
    port = free_port()
    env = worker_env(settings, SEGMENT_REDIS_URL=f"redis://127.0.0.1:{port}/0")
    log = tmp_path / "worker.log"
    with log.open("w") as stderr:
        worker = subprocess.Popen(
            [*CLI, "run", "--stop-after-idle", "2"],
            env=env,
            stderr=stderr,
            stdout=subprocess.DEVNULL,
        )
    try:
        wait_for(lambda: "Redis ping failed" in log.read_text(), what="a retry message")
        assert worker.poll() is None  # still running, waiting for Redis
        with EmbeddedRedis(port=port):
            assert worker.wait(timeout=120) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
    assert "Traceback" not in log.read_text()


def test_sigterm_drains_and_exits_zero(settings: Settings, tmp_path: Path) -> None:
    ensure_topics(settings.kafka, partitions=1)
    log = tmp_path / "worker.log"
    with log.open("w") as stderr:
        worker = subprocess.Popen(
            [*CLI, "run"], env=worker_env(settings), stderr=stderr, stdout=subprocess.DEVNULL
        )
    wait_for(lambda: "joined consumer group" in log.read_text(), what="the worker to join")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=60) == 0
    text = log.read_text()
    assert "draining" in text and "worker stopped" in text and "Traceback" not in text


def test_demo_ends_by_itself_with_a_summary() -> None:
    started = time.monotonic()
    ran = subprocess.run(
        [*CLI, "demo", "--duration", "12", "--users", "400", "--rate", "800"],
        env={**os.environ, "SEGMENT_METRICS_PORT": "0", "COLUMNS": "120"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert ran.returncode == 0, ran.stderr
    assert "Segments at the end of the demo" in ran.stdout
    assert "events applied" in ran.stdout
    assert "Traceback" not in ran.stdout + ran.stderr
    assert time.monotonic() - started < 120


def test_demo_stopped_with_sigterm_drains_sums_up_and_stops_its_servers() -> None:
    """As Ctrl-C does: the worker drains, the summary is printed, and the embedded
    broker and Redis are stopped by the demo itself, not left to their guards."""
    demo = subprocess.Popen(
        [*CLI, "demo", "--duration", "300", "--users", "400", "--rate", "800"],
        env={**os.environ, "SEGMENT_METRICS_PORT": "0", "COLUMNS": "200"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert demo.stdout is not None
    header = ""
    while "Ctrl-C to stop" not in header:  # printed once the pipeline runs
        header = demo.stdout.readline()
        assert header or demo.poll() is None, demo.stderr.read()  # type: ignore[union-attr]
    redis_port = int(re.search(r"Redis at redis://[^:]+:(\d+)", header).group(1))  # type: ignore[union-attr]
    demo.send_signal(signal.SIGTERM)
    out, err = demo.communicate(timeout=120)
    assert demo.returncode == 0, err
    assert "interrupted; stopping" in out and "Segments at the end of the demo" in out
    assert "events applied" in out
    assert "Traceback" not in out + err
    with pytest.raises(redis.ConnectionError):  # its Redis is gone with it
        redis.Redis(port=redis_port, socket_connect_timeout=2).ping()


# A process that starts both embedded servers, prints their pids, then waits for stdin.
SERVERS_THEN_WAIT = """
import sys
from worker.embedded import EmbeddedBroker, EmbeddedRedis
with EmbeddedBroker() as broker, EmbeddedRedis() as redis_server:
    print(broker.pid, redis_server.pid, flush=True)
    sys.stdin.read()
"""


def running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie has stopped; only its reaping is left)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def guards_of(pids: list[int]) -> list[int]:
    """The guard processes (worker/embedded.py) watching any of these server pids."""
    watching = {str(pid) for pid in pids}
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(argv) > 2 and b"pidfd_open" in argv[-3] and argv[-2].decode() in watching:
            found.append(int(proc.name))
    return found


@pytest.mark.parametrize("ending", ["killed", "exits"])
def test_embedded_servers_end_with_the_process_that_started_them(ending: str) -> None:
    """`kill -9` of a demo, a bench or a test run skips its context managers, and the
    servers run in sessions of their own: their guards stop them. A parent that exits
    cleanly stops them itself, and their guards exit with them."""
    parent = subprocess.Popen(
        [sys.executable, "-c", SERVERS_THEN_WAIT],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdin is not None and parent.stdout is not None
    servers = [int(pid) for pid in parent.stdout.readline().split()]
    try:
        assert len(servers) == 2 and all(running(pid) for pid in servers)
        assert len(guards_of(servers)) == 2
        if ending == "killed":
            parent.kill()
        else:
            parent.stdin.close()
        parent.wait(timeout=30)
        wait_for(lambda: not any(map(running, servers)), 20, "the servers to stop")
        wait_for(lambda: not guards_of(servers), 20, "the guards to exit")
    finally:
        for pid in filter(running, servers):
            os.kill(pid, signal.SIGKILL)
    assert parent.returncode == (-signal.SIGKILL if ending == "killed" else 0)


def test_replay_validates_rows_reports_line_numbers_and_sends_the_rest(
    settings: Settings, tmp_path: Path
) -> None:
    import csv
    import gzip

    from kafka import KafkaConsumer

    from worker.source import ensure_topics, kafka_client_config

    ensure_topics(settings.kafka, partitions=2)
    events = generate_events(300)
    jsonl = tmp_path / "events.jsonl.gz"
    lines = [orjson.dumps(e) for e in events]
    lines[10] = b'{"event_type": "page_view"}'  # line 11: invalid
    lines[20] = b"not json"  # line 21
    with gzip.open(jsonl, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    ran = subprocess.run(
        [*CLI, "replay", str(jsonl), "--topic", settings.kafka.clickstream_topic],
        env=worker_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 0, ran.stderr
    assert "line 11" in ran.stdout and "line 21" in ran.stdout
    assert "replayed 298 of 300 rows" in ran.stdout

    table = tmp_path / "clicks.csv"
    with table.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "kind", "customer", "ts", "price"])
        writer.writerow(["c1", "product_view", "u-9", "1795342874000", "12.5"])
        writer.writerow(["c2", "page_view", "u-9", "2026-11-22T10:21:15Z", ""])
        writer.writerow(["c3", "page_view", "", "1795342874000", ""])  # line 4: no user
    ran = subprocess.run(
        [
            *CLI,
            "replay",
            str(table),
            "--topic",
            settings.kafka.clickstream_topic,
            "--map",
            "id=event_id",
            "--map",
            "kind=event_type",
            "--map",
            "customer=user_id",
            "--map",
            "ts=timestamp",
        ],
        env=worker_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 0, ran.stderr
    assert "line 4" in ran.stdout and "replayed 2 of 3 rows" in ran.stdout

    consumer = KafkaConsumer(
        settings.kafka.clickstream_topic,
        **kafka_client_config(settings.kafka),
        auto_offset_reset="earliest",
        consumer_timeout_ms=5000,
    )
    received = [m for m in consumer]
    consumer.close()
    assert len(received) == 300
    assert all(m.key == orjson.loads(m.value)["user_id"].encode() for m in received)


def test_a_paced_producer_keeps_to_its_rate_a_burst_at_a_time(settings: Settings) -> None:
    """`produce` with a rate sends `burst` events, then waits until they are due: never
    ahead of the rate. (What the bursts are for, fewer record batches in the embedded
    broker's partitions, this does not check: see the README's soak row.)"""
    from worker.replay import produce

    ensure_topics(settings.kafka, partitions=2)
    started = time.monotonic()
    calls: list[tuple[int, float]] = []
    sent = produce(
        generate_events(2000),
        settings,
        rate=4000,
        burst=500,
        linger_ms=50,
        on_sent=lambda n: calls.append((n, time.monotonic() - started)),
    )
    assert sent == 2000
    assert [n for n, _ in calls] == [500, 1000, 1500, 2000, 2000]
    for n, at in calls[1:4]:  # each burst goes once the one before it is due
        assert at >= (n - 500) / 4000


def generate_events(n: int) -> list[dict[str, object]]:
    return generate(max(n // 10, 1), n, seed=9).events


def test_json_logs_are_one_object_per_line(settings: Settings, tmp_path: Path) -> None:
    import json

    ensure_topics(settings.kafka, partitions=1)
    ran = subprocess.run(
        [*CLI, "run", "--log-format", "json", "--stop-after-idle", "1"],
        env=worker_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 0, ran.stderr
    records = [json.loads(line) for line in ran.stderr.splitlines() if line.strip()]
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    assert any("joined consumer group" in r["message"] for r in records)


def test_a_read_racing_a_close_is_not_logged_but_other_transport_errors_are() -> None:
    from logging.handlers import BufferingHandler

    from worker.cli import _settings

    _settings(None)
    transport, logged = logging.getLogger("kafka.net.transport"), BufferingHandler(10)
    transport.addHandler(logged)
    try:
        for error in (AttributeError("'NoneType' object has no attribute 'recv'"), OSError()):
            try:
                raise error
            except Exception:
                transport.exception("Error receiving network data closing socket")
    finally:
        transport.removeHandler(logged)
    assert [r.exc_info[1] for r in logged.buffer if r.exc_info] == [error]


def test_reader_refuses_an_unknown_key_format(redis_client: redis.Redis) -> None:
    from schemas.reader import IncompatibleFormat, SegmentReader

    redis_client.set("seg:format", 1)
    SegmentReader(redis_client)
    redis_client.set("seg:format", 99)
    with pytest.raises(IncompatibleFormat, match="format 99"):
        SegmentReader(redis_client)


def test_input_topics_with_different_partition_counts_are_refused(settings: Settings) -> None:
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    from worker.source import kafka_client_config

    admin = KafkaAdminClient(**kafka_client_config(settings.kafka))
    admin.create_topics(
        [
            NewTopic(settings.kafka.clickstream_topic, 4, 1),
            NewTopic(settings.kafka.purchases_topic, 2, 1),
        ]
    )
    admin.close()
    ran = subprocess.run(
        [*CLI, "run"], env=worker_env(settings), capture_output=True, text=True, timeout=120
    )
    assert ran.returncode == 2
    assert "same number of partitions" in ran.stdout + ran.stderr
    assert "Traceback" not in ran.stdout + ran.stderr


class ClusterNode(EmbeddedRedis):
    """A one-node Redis Cluster: a redis-server in cluster mode that serves every slot.
    Its cluster bus listens 10,000 ports above it, so it needs a port below 55,536."""

    def __init__(self) -> None:
        port = free_port()
        while port > 55_535:
            port = free_port()
        super().__init__(port)

    def command(self) -> list[str]:
        return [*super().command(), "--cluster-enabled", "yes"]

    def start(self) -> ClusterNode:
        super().start()
        client = redis.Redis("127.0.0.1", self.port)
        client.execute_command("CLUSTER ADDSLOTS", *range(16384))
        wait_for(lambda: client.cluster("info")["cluster_state"] == "ok", what="cluster up")
        client.close()
        return self


def test_a_redis_cluster_is_refused_at_start_naming_the_setting(settings: Settings) -> None:
    with ClusterNode() as node:
        ran = subprocess.run(
            [*CLI, "run"],
            env=worker_env(settings, SEGMENT_REDIS_URL=node.url),
            capture_output=True,
            text=True,
            timeout=60,
        )
        written = redis.Redis("127.0.0.1", node.port).dbsize()
    assert ran.returncode == 2
    assert "redis.url names a node of a Redis Cluster" in ran.stderr
    assert "Traceback" not in ran.stdout + ran.stderr
    assert written == 0  # refused before the first write

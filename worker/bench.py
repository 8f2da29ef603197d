"""`segment-worker bench`: how fast, how fresh and how big, measured on real parts.

Worker processes (`segment-worker run`, exactly as deployed) consume pre-produced events
from a real broker into a real Redis, embedded unless given. Figures come from the
workers' own /metrics and from /proc, so the benchmark measures what production would
report. The stages, in order:

1. raw ceiling: a bare kafka-python consumer with the worker's fetch settings reads every
   record and does nothing else;
2. full speed: one worker on the same records: sustained events/s between 10 % and 90 %
   of them (past warm-up), CPU seconds per 1k events, peak RSS;
3. scale-out: two workers sharing the partitions, next to the one worker's stage (the
   machine's speed drifts over minutes): throughput, the CPU split between broker,
   Redis and workers, and each worker's CPU per 1k of its events, trainer and follower;
4. footprint: Redis bytes per user (MEMORY USAGE of everything stored about a sample, by key);
5. batch alternative: load every profile, fit scikit-learn k-means (k-means++, same k),
   write every user's segment back; its wall time bounds the freshness of a schedule;
6. latency: a worker in steady state (its own shop's first half, unpaced, seeds and
   settles its model) under a paced producer at half the full speed for the second
   half: p50/p95/p99 from a record's Kafka timestamp to its batch written to Redis.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from prometheus_client.parser import text_string_to_metric_families
from redis.exceptions import RedisError
from rich.progress import Progress
from sklearn.cluster import KMeans as BatchKMeans
from sklearn.metrics import adjusted_rand_score

from config.settings import Settings, to_env
from schemas.reader import text
from schemas.records import RedisKeys
from worker.app import settled_gc
from worker.embedded import Guard, free_port
from worker.features import FEATURES, FeatureExtractor
from worker.generator import event_ms, generate
from worker.profiles import DAY_MS
from worker.replay import produce
from worker.sink import connect, delete_keys, stored_profiles
from worker.source import consumer_config, delete_topics, ensure_topics

log = logging.getLogger(__name__)

PARTITIONS = 4
LATENCY = "segmentation_event_to_segment_latency_seconds"  # the worker's histograms read
BATCH = "segmentation_batch_seconds"
POLL_WAIT = "segmentation_poll_wait_seconds"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# The latency stage's producer sends what 50 ms bring at once. The embedded broker's
# fetches cost more the more record batches a partition holds, so its load generator's
# batch count is part of what the stage measures: sent 100 events at a time, with twice
# the batches, the broker used about 1.7 times the CPU and p50 was 1.6-4.4 times as long
# (README, Latency).
SEND_EVERY_S = 0.05
# The latency stage's warm-up is sent in big batches: unmeasured, it should leave the
# broker as few as it can, since each batch a partition holds adds to every later fetch
# (about a millisecond per 1,000 batches per partition here). Its 360,000 events at
# 9,000 events/s made 6,844 batches as the other stages send, 664 so (README, Latency).
WARM_UP_BURST = 5_000
WARM_UP_LINGER_MS = 100


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


Samples = dict[str, list[tuple[dict[str, str], float]]]  # sample name: [(labels, value)]


def scrape(port: int) -> Samples:
    """A worker's /metrics; empty if not up."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return {}
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def total(samples: Samples, name: str) -> float:
    return sum(value for _, value in samples.get(name, []))


def histogram_quantile(q: float, buckets: dict[float, float]) -> float:
    """Prometheus' histogram_quantile over cumulative bucket counts {le: count}."""
    bounds = sorted(buckets)
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for le in bounds:
        if buckets[le] >= rank:
            if le == float("inf"):
                return lower
            return lower + (le - lower) * (rank - below) / max(buckets[le] - below, 1e-12)
        lower, below = le, buckets[le]
    return lower


@dataclass
class WorkerProcess:
    """A `segment-worker run` process and what it reports."""

    settings: Settings
    idle_s: float
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    guard: Guard | None = None  # stops the worker if the bench is killed

    def start(self) -> WorkerProcess:
        metrics = self.settings.metrics.model_copy(update={"host": "127.0.0.1", "port": self.port})
        env = {k: v for k, v in os.environ.items() if not k.startswith("SEGMENT_")}
        env |= to_env(self.settings.model_copy(update={"metrics": metrics}))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker", "run", "--stop-after-idle", str(self.idle_s)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.guard = Guard(self.process.pid)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.alive():
            assert self.process is not None
            self.process.terminate()
            self.process.wait(60)
        if self.guard is not None:
            self.guard.close()
            self.guard = None


@dataclass
class Sample:
    """One scrape of a full-speed stage: per worker, events applied and CPU seconds."""

    at: float
    applied: list[float]
    cpu_s: list[float]
    leading: list[bool]  # holds the model's lease: trains and publishes

    @property
    def events(self) -> float:
        return sum(self.applied)


class Bench:
    def __init__(
        self,
        settings: Settings,
        events: int,
        users: int,
        latency_seconds: float,
        progress: Progress,
        broker_pid: int | None = None,
        redis_pid: int | None = None,
        latency_rate: float | None = None,
    ) -> None:
        self.base = settings
        self.events = events
        self.users = users
        self.latency_seconds = latency_seconds
        self.latency_rate = latency_rate  # events/s offered; None: half the full speed
        self.progress = progress
        self.pids = {"broker": broker_pid, "redis": redis_pid}
        self.run_id = uuid.uuid4().hex[:6]
        self.redis = connect(settings.redis)
        self.groups: set[str] = set()  # consumer groups of the stages, deleted at the end
        self.started: list[WorkerProcess] = []  # stopped at the end, if a stage was cut short

    def settings_for(self, name: str, prefix: str, topics: str | None = None) -> Settings:
        topics = topics or name
        self.groups.add(f"bench-{self.run_id}-{name}")
        kafka = self.base.kafka.model_copy(
            update={
                "group_id": f"bench-{self.run_id}-{name}",
                "clickstream_topic": f"bench-{self.run_id}-{topics}-clicks",
                "purchases_topic": f"bench-{self.run_id}-{topics}-purchases",
                "dlq_topic": f"bench-{self.run_id}-dlq",
                "changes_topic": f"bench-{self.run_id}-changes",
                "lifecycle_topic": f"bench-{self.run_id}-lifecycle",
            }
        )
        redis = self.base.redis.model_copy(update={"key_prefix": f"bench{self.run_id}{prefix}"})
        return self.base.model_copy(update={"kafka": kafka, "redis": redis})

    def run(self) -> dict[str, Any]:
        """Every stage; then the run's keys, topics and groups are deleted, so that given
        servers (`--given`) are left as the bench found them."""
        try:
            return self.stages()
        finally:
            for worker in self.started:
                worker.stop()
            try:
                self.forget("")
                delete_topics(self.base.kafka, f"bench-{self.run_id}-", self.groups)
            except (KafkaError, RedisError) as exc:  # do not hide why the stages stopped
                log.warning(
                    "bench: could not delete all of run %s's keys, topics and groups: %s",
                    self.run_id,
                    exc,
                )

    def stages(self) -> dict[str, Any]:
        main = self.settings_for("main", "a")
        ensure_topics(main.kafka, PARTITIONS)
        task = self.progress.add_task("generating and producing events", total=self.events)
        shop = generate(users=self.users, events=self.events, seed=11)
        produce(shop.events, main, on_sent=lambda n: self.progress.update(task, completed=n))
        figures: dict[str, Any] = {
            "events": self.events,
            "users": len(shop.truth),
            "partitions": PARTITIONS,
            "cores": os.cpu_count(),
        }
        figures["raw_ceiling_events_per_s"] = self.raw_ceiling(main, task)
        figures["full_speed"] = self.full_speed(main, task, workers=1)
        figures["full_speed"]["ratio_to_raw"] = round(
            figures["full_speed"]["events_per_s"] / figures["raw_ceiling_events_per_s"], 3
        )
        # right after the one worker: this machine's speed drifts by a third over minutes
        scale = self.full_speed(self.settings_for("scale", "b", topics="main"), task, workers=2)
        scale["ratio_to_one_worker"] = round(
            scale["events_per_s"] / figures["full_speed"]["events_per_s"], 3
        )
        figures["scale_out"] = scale
        self.forget("b")  # the later stages scan Redis: keep their figures those of one shop
        footprint = self.bytes_per_user(main, list(shop.truth))
        figures["redis_bytes_per_user"] = round(sum(footprint.values()))
        figures["redis_bytes_per_user_by_key"] = {k: round(v) for k, v in footprint.items()}
        figures["batch_alternative"] = self.batch_alternative(main, task, shop.truth)
        half = figures["full_speed"]["events_per_s"] / 2
        figures["latency"] = self.latency(self.latency_rate or half, task)
        return figures

    def start_worker(self, settings: Settings, idle_s: float) -> WorkerProcess:
        worker = WorkerProcess(settings, idle_s).start()
        self.started.append(worker)
        return worker

    def forget(self, prefix: str) -> None:
        """Delete the Redis keys under a stage's prefix (all of this run's with "")."""
        delete_keys(self.redis, f"bench{self.run_id}{prefix}*")

    def raw_ceiling(self, settings: Settings, task: Any) -> float:
        self.progress.update(task, description="raw ceiling: bare consumer", completed=0)
        consumer = KafkaConsumer(**consumer_config(settings.kafka))
        partitions = [
            TopicPartition(topic, p)
            for topic in settings.kafka.input_topics
            for p in range(PARTITIONS)
        ]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        read, started = 0, time.monotonic()
        while read < self.events:
            read += sum(len(batch) for batch in consumer.poll(timeout_ms=1000).values())
            self.progress.update(task, completed=read)
        elapsed = time.monotonic() - started
        consumer.close()
        return round(read / elapsed)

    def full_speed(self, settings: Settings, task: Any, workers: int) -> dict[str, Any]:
        label = "full speed" if workers == 1 else f"scale-out: {workers} workers"
        self.progress.update(task, description=label, completed=0)
        # idle long enough to outlast a rebalance and a slow first fetch from deep offsets
        procs = [self.start_worker(settings, idle_s=15) for _ in range(workers)]
        others = {name: pid for name, pid in self.pids.items() if pid}
        other_cpu = {name: cpu_seconds(pid) for name, pid in others.items()}
        samples: list[Sample] = []
        peak = [0.0] * workers
        applied = [0.0] * workers
        cpu = [0.0] * workers
        leading = [False] * workers
        while any(p.alive() for p in procs):
            # a worker that has exited reports nothing: keep each one's last figures
            for i, p in enumerate(procs):
                seen = scrape(p.port)
                applied[i] = max(applied[i], total(seen, "segmentation_events_total"))
                if seen:
                    leading[i] = total(seen, "segmentation_model_leader") == 1
                with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                    cpu[i] = cpu_seconds(p.pid)
                    peak[i] = max(peak[i], peak_rss_mb(p.pid))
            samples.append(Sample(time.monotonic(), list(applied), list(cpu), list(leading)))
            self.progress.update(task, completed=sum(applied))
            time.sleep(0.25)
        for p in procs:
            p.stop()
        other_cpu = {name: cpu_seconds(pid) - other_cpu[name] for name, pid in others.items()}
        start, end = sustained(samples, self.events)
        events = end.events - start.events
        per_worker = []
        for i in range(workers):
            applied_i, cpu_i = end.applied[i] - start.applied[i], end.cpu_s[i] - start.cpu_s[i]
            per_worker.append(
                {
                    "role": "trainer" if end.leading[i] else "follower",
                    "events_share": round(applied_i / events, 3),
                    "cpu_s_per_1k_events": round(cpu_i / max(applied_i, 1) * 1000, 3),
                }
            )
        result: dict[str, Any] = {
            "workers": workers,
            "events_per_s": round(events / (end.at - start.at)),
            # all workers' CPU over all their events
            "cpu_s_per_1k_events": round((sum(end.cpu_s) - sum(start.cpu_s)) / events * 1000, 3),
            "per_worker": per_worker,
            "peak_rss_mb": [round(p) for p in peak],
            "wall_s": round(samples[-1].at - samples[0].at, 1),
        }
        if other_cpu:
            result["cpu_s_whole_run"] = {
                **{name: round(v, 1) for name, v in other_cpu.items()},
                "workers": round(sum(samples[-1].cpu_s), 1),
            }
        return result

    def bytes_per_user(self, settings: Settings, users: list[str]) -> dict[str, float]:
        """`MEMORY USAGE` of everything stored about a user, by key: the user hash other
        services read, the profile, and the entry in a segment's membership set (the
        sets' bytes over their members). The parts say where the bytes go."""
        keys = RedisKeys(settings.redis.key_prefix)
        sample = users[:: max(len(users) // 1000, 1)]
        pipe = self.redis.pipeline(transaction=False)
        for user in sample:
            pipe.memory_usage(keys.user(user), samples=0)
            pipe.memory_usage(keys.profile(user), samples=0)
        used = [v or 0 for v in pipe.execute()]
        members = [text(s) for s in self.redis.smembers(keys.segments)]
        zset_bytes = sum(self.redis.memory_usage(keys.members(s), samples=0) or 0 for s in members)
        zset_users = sum(self.redis.zcard(keys.members(s)) for s in members)
        return {
            "user_hash": sum(used[0::2]) / len(sample),
            "profile": sum(used[1::2]) / len(sample),
            "membership": zset_bytes / max(zset_users, 1),
        }

    def batch_alternative(
        self, settings: Settings, task: Any, personas: dict[str, str]
    ) -> dict[str, Any]:
        """What the streaming worker replaces: a scheduled job over all profiles. Both
        its segments and the streaming ones are scored against the generator's personas
        (adjusted Rand index), so speed is not bought with quality."""
        self.progress.update(task, description="batch alternative", completed=0)
        keys = RedisKeys(settings.redis.key_prefix)
        started = time.monotonic()
        extract = FeatureExtractor(settings.profile)
        rows: list[list[float]] = []
        ids: list[str] = []
        for profile in stored_profiles(self.redis, keys):
            x = extract(profile)
            ids.append(profile.user_id)
            rows.append([x[name] for name in FEATURES])
        loaded = time.monotonic()
        points = np.array(rows)
        points = (points - points.mean(axis=0)) / np.maximum(points.std(axis=0), 1e-9)
        labels = BatchKMeans(
            n_clusters=settings.model.n_clusters, init="k-means++", n_init=1, random_state=1
        ).fit_predict(points)
        fitted = time.monotonic()
        pipe = self.redis.pipeline(transaction=False)
        for user, label in zip(ids, labels, strict=True):
            pipe.hset(f"{keys.prefix}:batch-user:{user}", "segment", f"b{label}")
        pipe.execute()
        done = time.monotonic()
        pipe = self.redis.pipeline(transaction=False)
        for user in ids:
            pipe.hget(keys.user(user), "segment")
        streaming = [(segment or b"").decode() for segment in pipe.execute()]
        truth = [personas[user] for user in ids]
        return {
            "ari_streaming_vs_personas": round(float(adjusted_rand_score(truth, streaming)), 3),
            "ari_batch_vs_personas": round(float(adjusted_rand_score(truth, labels)), 3),
            "users": len(ids),
            "load_s": round(loaded - started, 2),
            "fit_s": round(fitted - loaded, 2),
            "write_s": round(done - fitted, 2),
            "wall_s": round(done - started, 2),
        }

    def latency(self, rate: float, task: Any) -> dict[str, Any]:
        """A worker in steady state under a paced load. It gets a shop of its own: the
        first half unpaced and unmeasured, so that its model seeds and settles; then the
        second half at `rate`, measured by what it adds to the worker's histogram. (A
        shop replayed against the full-speed stage's model would rewind its event time
        and give its user ids other personas: a drift the model adapts to, not a load.)
        A full run's warm-up spans about ten days of event time, so the model counts as
        settled half way through it (`model.settle_days`, if that is sooner): a settling
        model places users without the switch margin, which is no steady state."""
        count = int(rate * self.latency_seconds)
        shop = generate(users=max(self.users // 5, 100), events=2 * count, seed=12, drifts=())
        warm_up, paced = shop.events[:count], shop.events[count:]
        settings = self.settings_for("latency", "l")
        settled = settle_days_within(warm_up, settings.model.settle_days)
        model = settings.model.model_copy(update={"settle_days": settled})
        settings = settings.model_copy(update={"model": model})
        ensure_topics(settings.kafka, PARTITIONS)
        worker = self.start_worker(settings, idle_s=5)
        wait(worker.ready, 120)
        self.progress.update(task, description="latency: warm-up", completed=0, total=count)
        produce(
            warm_up,
            settings,
            on_sent=lambda n: self.progress.update(task, completed=n),
            linger_ms=WARM_UP_LINGER_MS,
            burst=WARM_UP_BURST,
        )
        wait(lambda: total(scrape(worker.port), "segmentation_events_total") >= count, 600)
        before = scrape(worker.port)
        self.progress.update(task, description=f"latency at {rate:.0f} events/s", completed=0)
        pids = {**{k: p for k, p in self.pids.items() if p}, "worker": worker.pid}
        pids["load_generator"] = os.getpid()  # the paced producer runs in this process
        cpu_before, started = {k: cpu_seconds(p) for k, p in pids.items()}, time.monotonic()
        # The load generator should add little delay of its own: a short linger, and no
        # pauses of its cycle collector walking the shop's million objects (the records'
        # acks at p99 248 ms after their timestamps with them, 63 ms without).
        with settled_gc():
            produce(
                paced,
                settings,
                rate=rate,
                on_sent=lambda n: self.progress.update(task, completed=n),
                linger_ms=2,
                burst=max(1, round(rate * SEND_EVERY_S)),
            )
        paced_s = time.monotonic() - started
        cores = {k: round((cpu_seconds(p) - cpu_before[k]) / paced_s, 2) for k, p in pids.items()}
        after = before
        while worker.alive():
            after = scrape(worker.port) or after
            time.sleep(0.25)
        worker.stop()
        self.progress.update(task, total=self.events)
        return {
            "offered_events_per_s": round(rate),
            "events": len(paced),
            "warm_up_events": len(warm_up),
            "settle_days": round(settled, 3),
            **quantiles_ms("", LATENCY, before, after),
            # the worker's own share: processing a batch, from decoding to the commit
            **quantiles_ms("batch_", BATCH, before, after),
            # a poll's wall time, mostly the wait for a fetch (the median: the idle polls
            # at the end of the run, 0.5 s each, would count in the upper quantiles)
            "poll_wait_p50_ms": quantiles_ms("", POLL_WAIT, before, after)["p50_ms"],
            "cores_while_paced": cores,
        }


def sustained(samples: list[Sample], events: int) -> tuple[Sample, Sample]:
    """The scrapes around the run from 10 % to 90 % of the events: the last before 10 %
    and the first at 90 % or more, so the two differ even when a short, fast run covers
    that stretch between two scrapes."""
    before = [s for s in samples if s.events < 0.1 * events] or samples[:1]
    end = next(s for s in samples if s.events >= 0.9 * events)
    if end.at <= before[-1].at:
        raise RuntimeError(f"{events:,} events went by before the first scrape: too few to time")
    return before[-1], end


def settle_days_within(warm_up: list[dict[str, object]], settle_days: float) -> float:
    """`settle_days`, or half the warm-up's span of event time if that is sooner: the
    model a latency stage measures has settled before the measured events arrive."""
    span = (event_ms(warm_up[-1]) - event_ms(warm_up[0])) / DAY_MS
    return min(span / 2, settle_days)


def quantiles_ms(prefix: str, histogram: str, before: Samples, after: Samples) -> dict[str, float]:
    """p50/p95/p99 in ms of what a worker's histogram counted between two scrapes, as
    Prometheus' `histogram_quantile` over an `increase` would."""
    start, end = buckets(before, histogram), buckets(after, histogram)
    added = {le: end[le] - start.get(le, 0.0) for le in end}
    ms = {q: round(histogram_quantile(q / 100, added) * 1000, 1) for q in (50, 95, 99)}
    return {f"{prefix}p{q}_ms": v for q, v in ms.items()}


def buckets(samples: Samples, histogram: str) -> dict[float, float]:
    """A histogram of a scrape as cumulative counts {le: count}."""
    return {float(labels["le"]): value for labels, value in samples.get(f"{histogram}_bucket", [])}


def wait(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the worker did not get there within {timeout:.0f} s")
        time.sleep(0.1)


def rows(figures: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(figure, value, target) rows for the summary table."""
    full, lat, batch, scale = (
        figures["full_speed"],
        figures["latency"],
        figures["batch_alternative"],
        figures["scale_out"],
    )
    return [
        (
            "events / users / partitions",
            f"{figures['events']:,} / {figures['users']:,} / {figures['partitions']}",
            "",
        ),
        ("raw kafka-python ceiling", f"{figures['raw_ceiling_events_per_s']:,} events/s", ""),
        ("one worker, sustained", f"{full['events_per_s']:,} events/s", ""),
        (
            "sustained ÷ raw ceiling",
            f"{full['ratio_to_raw']:.3f}",
            "≥ 0.7",
        ),
        ("CPU per 1k events", f"{full['cpu_s_per_1k_events']:.3f} s", ""),
        ("worker peak RSS", f"{full['peak_rss_mb'][0]} MB", ""),
        (
            "Redis bytes per user",
            f"{figures['redis_bytes_per_user']} ("
            + ", ".join(
                f"{key.replace('_', ' ')} {n}"
                for key, n in figures["redis_bytes_per_user_by_key"].items()
            )
            + ")",
            "≤ 400",
        ),
        (
            "latency load (after a warm-up)",
            f"{lat['offered_events_per_s']:,} events/s, {lat['events']:,} events"
            f" (model settled after {lat['settle_days']} days)",
            "",
        ),
        ("p50 event → Redis", f"{lat['p50_ms']} ms", "≤ 50 ms"),
        ("p95 event → Redis", f"{lat['p95_ms']} ms", ""),
        ("p99 event → Redis", f"{lat['p99_ms']} ms", "≤ 250 ms"),
        (
            "the worker's batch processing, p50 / p99 (its share of the latency)",
            f"{lat['batch_p50_ms']} / {lat['batch_p99_ms']} ms",
            "",
        ),
        ("the worker's poll waiting for a fetch, p50", f"{lat['poll_wait_p50_ms']} ms", ""),
        (
            "cores in use while paced",
            ", ".join(f"{k} {v}" for k, v in lat["cores_while_paced"].items()),
            "",
        ),
        (
            "batch k-means: load / fit / write",
            f"{batch['load_s']} / {batch['fit_s']} / {batch['write_s']} s",
            "",
        ),
        (
            "batch wall time (min. staleness ≈ 2×)",
            f"{batch['wall_s']} s for {batch['users']:,} users",
            "",
        ),
        (
            "segment quality: ARI vs personas",
            f"streaming {batch['ari_streaming_vs_personas']}, "
            f"batch k-means {batch['ari_batch_vs_personas']}",
            "",
        ),
        (
            "two workers, sustained",
            f"{scale['events_per_s']:,} events/s (× {scale['ratio_to_one_worker']:.2f})",
            "",
        ),
        (
            "two workers, CPU per 1k events",
            f"{scale['cpu_s_per_1k_events']:.3f} s ("
            + ", ".join(
                f"{w['role']} {w['cpu_s_per_1k_events']:.3f} s on {w['events_share']:.0%}"
                for w in scale["per_worker"]
            )
            + ")",
            "not above one worker's",
        ),
        (
            "two workers, CPU split (whole run)",
            ", ".join(f"{k} {v} s" for k, v in scale.get("cpu_s_whole_run", {}).items()),
            "",
        ),
    ]

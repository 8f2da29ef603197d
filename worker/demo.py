"""`segment-worker demo`: the whole pipeline on one machine, with a live segment table.

Embedded broker and Redis, the synthetic shop producing into Kafka at a steady rate, the
worker consuming it, `/metrics` served, and a table of segments that refreshes every
second. Ends by itself after `duration` seconds (or on Ctrl-C) and stops everything it
started.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass

from prometheus_client.metrics import MetricWrapperBase
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from config.settings import Settings
from schemas.reader import SegmentReader
from worker.app import Worker
from worker.embedded import EmbeddedBroker, EmbeddedRedis, free_port
from worker.generator import generate
from worker.metrics import Metrics
from worker.replay import produce
from worker.sink import connect
from worker.source import ensure_topics

log = logging.getLogger(__name__)


@dataclass
class _Rates:
    """Events/s from successive readings of the events counter."""

    last_total: float = 0.0
    last_time: float = 0.0

    def update(self, total: float) -> float:
        now = time.monotonic()
        rate = (total - self.last_total) / (now - self.last_time) if self.last_time else 0.0
        self.last_total, self.last_time = total, now
        return rate


def _sum(metric: MetricWrapperBase) -> float:
    """Sum of a counter's or gauge's children (not the `_created` timestamps)."""
    return sum(
        s.value for m in metric.collect() for s in m.samples if not s.name.endswith("_created")
    )


def segment_table(reader: SegmentReader, title: str) -> Table:
    table = Table(title=title, expand=True)
    table.add_column("id", style="bold cyan", no_wrap=True)
    table.add_column("name", style="bold")
    table.add_column("users", justify="right")
    table.add_column("description", style="dim")
    segments = reader.segments()
    for segment_id, seg in segments.items():
        table.add_row(segment_id, seg.name, f"{seg.size:,}", seg.description)
    if not segments:
        table.add_row("…", "warming up: the model seeds from the first profiles", "", "")
    return table


def run_demo(
    settings: Settings, duration: float, users: int, rate: float, console: Console
) -> None:
    with EmbeddedBroker() as broker, EmbeddedRedis() as redis_server:
        port = settings.metrics.port
        settings = settings.model_copy(
            update={
                "kafka": settings.kafka.model_copy(
                    update={
                        "bootstrap_servers": broker.bootstrap_servers,
                        "session_timeout_ms": 6000,
                        "heartbeat_interval_ms": 1000,
                    }
                ),
                "redis": settings.redis.model_copy(update={"url": redis_server.url}),
                "metrics": settings.metrics.model_copy(update={"port": _port_or_free(port)}),
            }
        )
        ensure_topics(settings.kafka, partitions=4)
        shop = generate(users, int(rate * duration * 1.5))
        stop = threading.Event()
        metrics = Metrics()
        worker = Worker(settings, metrics, stop)
        threads = [
            threading.Thread(
                target=produce,
                args=(shop.events, settings),
                # a quarter second's events a batch: the embedded broker's fetches slow
                # down with the number of batches a partition holds (README, CLI)
                kwargs={
                    "rate": rate,
                    "stop": stop,
                    "burst": max(100, int(rate / 4)),
                    "linger_ms": 250,
                },
                daemon=True,
            ),
            threading.Thread(target=worker.run, daemon=True),
        ]
        reader = SegmentReader(connect(settings.redis), settings.redis.key_prefix)
        rates = _Rates()
        try:  # from here on an interrupt stops the threads before the servers go
            for thread in threads:
                thread.start()
            console.print(
                f"[bold]segment-worker demo[/]: Kafka (Tansu) at {broker.bootstrap_servers}, "
                f"Redis at {redis_server.url}, metrics at "
                f"http://localhost:{settings.metrics.port}/metrics — Ctrl-C to stop"
            )
            ended = time.monotonic() + duration
            with Live(console=console, refresh_per_second=2) as live:
                while time.monotonic() < ended:
                    events_per_s = rates.update(_sum(metrics.events))
                    status = Text(
                        f"{events_per_s:,.0f} events/s · {_sum(metrics.events):,.0f} applied · "
                        f"{_sum(metrics.invalid):,.0f} to DLQ · lag {_sum(metrics.lag):,.0f} · "
                        f"model v{worker.model.version} · {ended - time.monotonic():.0f}s left"
                    )
                    live.update(Group(segment_table(reader, "Live segments"), status))
                    if stop.wait(1.0):
                        break
        except KeyboardInterrupt:
            console.print("interrupted; stopping")
        finally:
            stop.set()
            for thread in threads:
                if thread.is_alive():  # one interrupted before it started has nothing to join
                    thread.join(timeout=30)
        console.print(segment_table(reader, "Segments at the end of the demo"))
        console.print(
            f"{_sum(metrics.events):,.0f} events applied from {len(shop.truth):,} generated users, "
            f"{_sum(metrics.invalid):,.0f} sent to the DLQ, "
            f"{_sum(metrics.segment_changes):,.0f} segment changes published, "
            f"model v{worker.model.version}."
        )


def _port_or_free(port: int) -> int:
    """The configured metrics port, or a free one if something else holds it."""
    try:
        with socket.create_server(("0.0.0.0", port)):
            return port
    except OSError:
        return free_port()

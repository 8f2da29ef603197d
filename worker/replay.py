"""Events into Kafka: backfills from JSONL or CSV files (optionally gzipped), and the
producer the generator and demo use.

Rows of a file that do not validate against the event schema are reported with their
line number and not sent, so a backfill never feeds the DLQ with a file's known-bad rows.
"""

from __future__ import annotations

import csv
import gzip
import io
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import orjson
from kafka import KafkaProducer
from pydantic import ValidationError

from config.settings import Settings
from schemas.events import EVENT_ADAPTER
from worker.source import kafka_client_config


def produce(
    events: Iterable[dict[str, object]],
    settings: Settings,
    topic: str | None = None,
    rate: float | None = None,
    stop: threading.Event | None = None,
    on_sent: Callable[[int], None] = lambda _: None,
    linger_ms: int = 20,
    burst: int = 100,
) -> int:
    """Send events keyed by user id and return how many were sent.

    To `topic`, else purchases to the purchases topic and the rest to the clickstream;
    paced to `rate` events/s when given, `burst` events at a time; `stop` ends it early.
    `linger_ms` trades throughput for the delay a record waits in the producer. With
    a longer linger, a burst goes out as one record batch per partition: a long paced
    run of small bursts leaves many small batches, and the embedded broker's fetches
    slow down with the number of batches a partition holds (README, CLI).
    """
    kafka = settings.kafka
    stop = stop or threading.Event()
    producer = KafkaProducer(
        **kafka_client_config(kafka),
        linger_ms=linger_ms,
        batch_size=16_384 * max(1, burst // 100),  # the default's room per event
        acks="all",
    )
    started = time.monotonic()
    sent = 0
    try:
        for event in events:
            if stop.is_set():
                break
            default = kafka.purchases_topic if event["event_type"] == "purchase" else None
            producer.send(
                topic or default or kafka.clickstream_topic,
                key=str(event["user_id"]).encode(),
                value=orjson.dumps(event),
            )
            sent += 1
            if sent % burst == 0:
                on_sent(sent)
                ahead = sent / rate - (time.monotonic() - started) if rate else 0.0
                if ahead > 0 and stop.wait(ahead):
                    break
        producer.flush()
        on_sent(sent)
    finally:
        producer.close()
    return sent


@dataclass(frozen=True, slots=True)
class Row:
    line: int
    event: dict[str, object] | None
    error: str | None = None


def parse_mapping(pairs: list[str]) -> dict[str, str]:
    """`["csv_col=field", ...]` -> {csv_col: field}; ValueError names a malformed pair."""
    mapping = {}
    for pair in pairs:
        column, sep, name = pair.partition("=")
        if not sep or not column or not name:
            raise ValueError(f"--map expects csv_column=field, got {pair!r}")
        mapping[column] = name
    return mapping


def _open(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path), encoding="utf-8", newline="")
    return path.open(encoding="utf-8", newline="")


def _format(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s != ".gz"]
    kind = suffixes[-1] if suffixes else ""
    if kind not in (".jsonl", ".csv"):
        raise ValueError(f"{path}: expected .jsonl or .csv (optionally .gz)")
    return kind


def rows(path: Path, mapping: dict[str, str] | None = None) -> Iterator[Row]:
    """Every row of the file as a validated event dict, or the reason it is not one."""
    kind = _format(path)
    with _open(path) as f:
        if kind == ".jsonl":
            for number, text in enumerate(f, start=1):
                if text.strip():
                    try:
                        yield _validated(number, orjson.loads(text))
                    except orjson.JSONDecodeError as exc:
                        yield Row(number, None, f"not JSON: {exc}")
        else:
            reader = csv.DictReader(f)
            for record in reader:
                yield _validated(reader.line_num, _from_csv(record, mapping or {}))


def _from_csv(record: dict[str, str], mapping: dict[str, str]) -> dict[str, object]:
    event: dict[str, object] = {}
    for column, value in record.items():
        if value in ("", None):
            continue  # an empty cell is an absent optional field
        name = mapping.get(column, column)
        event[name] = orjson.loads(value) if name == "items" else value
    return event


def _validated(line: int, raw: object) -> Row:
    try:
        EVENT_ADAPTER.validate_python(raw)
    except ValidationError as exc:
        detail = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}"
            for e in exc.errors()
        )
        return Row(line, None, detail)
    assert isinstance(raw, dict)
    return Row(line, raw)

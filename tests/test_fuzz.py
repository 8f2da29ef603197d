"""Bad input, generated: nothing crashes, and every record is applied or dead-lettered.

Property tests (hypothesis) over the decoder and the whole per-event path, then a stream
with fuzzed records mixed in through the real broker and Redis. The suite mixes in 5,000;
FUZZ_MESSAGES=100000 (`make fuzz`) runs the full version.
"""

from __future__ import annotations

import math
import os
import random

import orjson
import pytest
import redis
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from config.settings import ProfileSettings, Settings
from schemas.events import ALL_TYPES, ClickEvent, PurchaseEvent
from schemas.records import RedisKeys
from worker.decode import REASONS, DeadLetter, Decoded, Decoder
from worker.features import FeatureExtractor
from worker.generator import generate
from worker.profiles import Position, Profile, ProfileUpdater

POS = Position("clickstream", 0, 0)
decode = Decoder(max_event_bytes=64 * 1024)
updater = ProfileUpdater(ProfileSettings())
extract = FeatureExtractor(ProfileSettings())

ids = st.text(min_size=0, max_size=140)
numbers = st.one_of(
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1e308, -0.0]),
)
timestamps = st.one_of(
    numbers,
    st.sampled_from(
        [
            "2026-11-22T10:21:14Z",
            "2026-11-22T10:21:14+05:30",
            "1795342874000",
            "0001-01-01T00:00:00",
            "9999-12-31T23:59:59Z",
            "yesterday",
            "",
        ]
    ),
)
json_values = st.recursive(
    st.none() | st.booleans() | numbers | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)
events = st.fixed_dictionaries(
    {"event_type": st.sampled_from([*ALL_TYPES, "teleport", ""]), "user_id": ids},
    optional={
        "event_id": ids,
        "timestamp": timestamps,
        "session_id": st.one_of(st.none(), ids),
        "category": st.one_of(st.none(), ids),
        "price": numbers,
        "order_id": ids,
        "total": numbers,
        "currency": st.text(max_size=4),
        "items": st.lists(
            st.fixed_dictionaries(
                {"product_id": ids, "unit_price": numbers},
                optional={"quantity": numbers, "category": ids},
            ),
            max_size=3,
        ),
        "extra": json_values,
    },
)


@given(
    key=st.one_of(st.none(), st.binary(max_size=50)),
    value=st.one_of(st.none(), st.binary(max_size=300)),
)
def test_random_bytes_never_crash_the_decoder(key: bytes | None, value: bytes | None) -> None:
    result = decode(key, value, POS)
    assert isinstance(result, Decoded | DeadLetter)
    if isinstance(result, DeadLetter):
        assert result.reason in REASONS and result.value == value


@hsettings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(event=events, cut=st.integers(min_value=0, max_value=400))
def test_the_whole_per_event_path_never_crashes(event: dict[str, object], cut: int) -> None:
    """Decode, fold and featurize anything: a valid profile with finite features, or a
    dead letter with a known reason; truncated JSON included."""
    try:
        value = orjson.dumps(event)
    except (orjson.JSONEncodeError, TypeError):
        value = repr(event).encode()  # NaN/inf/huge ints are not JSON: send them as text
    for raw in (value, value[:cut]):
        key = str(event.get("user_id", "")).encode()
        result = decode(key, raw, POS)
        if isinstance(result, DeadLetter):
            assert result.reason in REASONS
            continue
        if isinstance(result.event, ClickEvent | PurchaseEvent):
            profile = Profile(result.event.user_id)
            updater.apply(profile, result.event, POS)
            assert Profile.decode(profile.user_id, profile.encode()) == profile
            assert all(math.isfinite(v) for v in extract(profile).values())


@given(user_id=st.text(alphabet=st.sampled_from("ab:*? \\{}[]é\u00a0"), min_size=1, max_size=20))
def test_user_ids_with_key_syntax_pass_through_unchanged(user_id: str) -> None:
    """Ids with ':', '*', spaces or braces are accepted and not trimmed or normalised, so
    the Redis key built from them (the id verbatim at its end) names exactly this user."""
    event = {
        "event_id": "e",
        "event_type": "page_view",
        "user_id": user_id,
        "timestamp": 1795342874000,
    }
    result = decode(user_id.encode(), orjson.dumps(event), POS)
    assert isinstance(result, Decoded)
    assert result.event.user_id == user_id
    assert RedisKeys("seg").user(result.event.user_id) == f"seg:user:{user_id}"


def fuzzed_record(rng: random.Random, users: list[str]) -> tuple[bytes | None, bytes]:
    """One hostile record: random bytes, truncated or huge JSON, wrong types, bad numbers,
    far timestamps, control characters, or a key that is not the user id."""
    user = rng.choice(users)
    base = {
        "event_id": f"f-{rng.random()}",
        "event_type": "product_view",
        "user_id": user,
        "timestamp": 1795342874000,
        "price": 10.0,
    }
    kind = rng.randrange(10)
    if kind == 0:
        return user.encode(), rng.randbytes(rng.randint(0, 200))
    if kind == 1:
        return user.encode(), orjson.dumps(base)[: rng.randint(1, 40)]
    if kind == 2:
        return user.encode(), b'{"event_type": "page_view", "pad": "' + b"x" * 70_000 + b'"}'
    if kind == 3:
        return user.encode(), orjson.dumps({**base, "price": rng.choice(["cheap", [], -5, {}])})
    if kind == 4:
        return user.encode(), orjson.dumps(base).replace(
            b"10.0", rng.choice([b"NaN", b"Infinity", b"-1e999"])
        )
    if kind == 5:
        return user.encode(), orjson.dumps(
            {**base, "timestamp": rng.choice([1, -5, 10**15, "0001-01-01", "soon"])}
        )
    if kind == 6:
        return user.encode(), orjson.dumps({**base, "user_id": user + "\n", "event_id": "\x00"})
    if kind == 7:
        return b"not-" + user.encode(), orjson.dumps(base)
    if kind == 8:
        return user.encode(), orjson.dumps(
            {**base, "event_type": rng.choice(["teleport", None, 7])}
        )
    return user.encode(), orjson.dumps([base])


@pytest.mark.integration
def test_fuzzed_records_mixed_into_a_stream_reconcile(
    settings: Settings, redis_client: redis.Redis, start_worker
) -> None:  # type: ignore[no-untyped-def]
    from kafka import KafkaProducer

    from worker.source import ensure_topics, kafka_client_config

    fuzz = int(os.environ.get("FUZZ_MESSAGES", "5000"))
    ensure_topics(settings.kafka, partitions=3)
    shop = generate(users=300, events=5000, seed=61)
    users = sorted(shop.truth)
    rng = random.Random(3)
    records = [(str(e["user_id"]).encode(), orjson.dumps(e)) for e in shop.events]
    records += [fuzzed_record(rng, users) for _ in range(fuzz)]
    rng.shuffle(records)
    producer = KafkaProducer(
        **kafka_client_config(settings.kafka), linger_ms=20, max_request_size=4_000_000
    )
    for key, value in records:
        producer.send(settings.kafka.clickstream_topic, key=key, value=value)
    producer.flush()
    producer.close()

    running = start_worker(settings)
    running.join()
    totals = running.worker.totals
    assert totals.applied + totals.invalid + totals.skipped == len(records)
    assert totals.invalid >= fuzz * 0.9  # a few fuzzed records can be valid events
    registry = running.worker.metrics.registry
    dead = sum(
        registry.get_sample_value("segmentation_events_invalid_total", {"reason": r}) or 0
        for r in REASONS
    )
    assert dead == totals.invalid
    reader_keys = RedisKeys()
    assert all(redis_client.exists(reader_keys.user(u)) for u in users)

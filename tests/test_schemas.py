"""The wire contract: what is accepted, what goes to the DLQ and with which reason."""

from __future__ import annotations

import orjson
import pytest

from schemas import ClickEvent, PurchaseEvent, UserDeleted
from worker.decode import DeadLetter, Decoded, Decoder
from worker.profiles import Position

POS = Position("clickstream", 3, 42)
CLICK = {
    "event_id": "e-1",
    "event_type": "product_view",
    "user_id": "u-42",
    "session_id": "s-9",
    "timestamp": "2026-11-22T10:21:14Z",
    "product_id": "p-7",
    "category": "audio",
    "price": 59.0,
}
PURCHASE = {
    "event_id": "o-1",
    "event_type": "purchase",
    "user_id": "u-42",
    "order_id": "o-1",
    "timestamp": 1732270874000,
    "currency": "USD",
    "total": 118.0,
    "items": [{"product_id": "p-7", "category": "audio", "quantity": 2, "unit_price": 59.0}],
}
DELETED = {
    "event_type": "user_deleted",
    "user_id": "u-42",
    "event_id": "d-1",
    "timestamp": 1732270874000,
}

decode = Decoder(max_event_bytes=4096)


def _decode(event: object, key: bytes | None = b"u-42") -> Decoded | DeadLetter:
    return decode(key, orjson.dumps(event), POS)


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        (CLICK, ClickEvent),
        (PURCHASE, PurchaseEvent),
        (DELETED, UserDeleted),
        ({**PURCHASE, "items": []}, PurchaseEvent),
        (
            {
                k: v
                for k, v in CLICK.items()
                if k in ("event_id", "event_type", "user_id", "timestamp")
            },
            ClickEvent,
        ),
    ],
)
def test_valid_events_decode_to_their_model(raw: dict[str, object], kind: type) -> None:
    result = _decode(raw)
    assert isinstance(result, Decoded)
    assert isinstance(result.event, kind)
    assert result.position == POS


@pytest.mark.parametrize(
    ("timestamp", "epoch_ms"),
    [
        ("2026-11-22T10:21:14Z", 1795342874000),
        ("2026-11-22T11:21:14+01:00", 1795342874000),
        ("2026-11-22T10:21:14", 1795342874000),  # no offset: UTC
        (1795342874000, 1795342874000),
        ("1795342874000", 1795342874000),
    ],
)
def test_timestamps_normalise_to_epoch_ms(timestamp: object, epoch_ms: int) -> None:
    result = _decode({**CLICK, "timestamp": timestamp})
    assert isinstance(result, Decoded)
    assert result.event.timestamp == epoch_ms


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "not_json"),
        (b"[1, 2]", "not_object"),
        (orjson.dumps({**CLICK, "event_type": "teleport"}), "unknown_event_type"),
        (orjson.dumps({k: v for k, v in CLICK.items() if k != "event_type"}), "unknown_event_type"),
        (orjson.dumps({k: v for k, v in CLICK.items() if k != "user_id"}), "invalid"),
        (orjson.dumps({**CLICK, "price": -1}), "invalid"),
        (orjson.dumps({**PURCHASE, "total": "lots"}), "invalid"),
        (
            b'{"event_id":"e","event_type":"purchase","user_id":"u-42","order_id":"o","timestamp":1795342874000,"total":NaN}',
            "not_json",
        ),
        (
            orjson.dumps(
                {**PURCHASE, "items": [{"product_id": "p", "quantity": 0, "unit_price": 1}]}
            ),
            "invalid",
        ),
        (orjson.dumps({**CLICK, "user_id": "u-42\n"}), "invalid"),
        (orjson.dumps({**CLICK, "timestamp": 1795342874}), "bad_timestamp"),  # seconds, not ms
        (orjson.dumps({**CLICK, "timestamp": "yesterday"}), "bad_timestamp"),
        (orjson.dumps({**CLICK, "category": "x" * 5000}), "too_large"),
    ],
)
def test_bad_input_becomes_a_dead_letter_with_its_reason(raw: bytes, reason: str) -> None:
    result = decode(b"u-42", raw, POS)
    assert isinstance(result, DeadLetter)
    assert result.reason == reason
    assert result.value == raw  # the original bytes travel to the DLQ
    assert result.position == POS
    assert result.detail


def test_key_must_be_the_user_id() -> None:
    assert isinstance(_decode(CLICK, key=b"u-43"), DeadLetter)
    assert isinstance(_decode(CLICK, key=None), DeadLetter)
    assert _decode(CLICK, key=b"u-43").reason == "key_mismatch"  # type: ignore[union-attr]


def test_tombstone_is_a_dead_letter() -> None:
    result = decode(b"u-42", None, POS)
    assert isinstance(result, DeadLetter)
    assert result.reason == "empty"


def test_user_ids_with_key_syntax_are_accepted() -> None:
    for user_id in ("a:b", "a*b", "with space", "ünï"):
        result = _decode({**CLICK, "user_id": user_id}, key=user_id.encode())
        assert isinstance(result, Decoded), user_id


def test_checked_in_json_schemas_are_current() -> None:
    """`segment-worker export-schemas` output equals the files in schemas/json/."""
    from schemas.jsonschema import SCHEMA_DIR, json_schemas

    expected = json_schemas()
    assert sorted(p.name for p in SCHEMA_DIR.glob("*.json")) == sorted(expected)
    for name, text in expected.items():
        assert (SCHEMA_DIR / name).read_bytes() == text, f"{name} is stale: run export-schemas"


def test_json_schema_describes_the_wire_format() -> None:
    from schemas.jsonschema import json_schemas

    change = orjson.loads(json_schemas()["segment-change.schema.json"])
    assert set(change["required"]) == {"user_id", "from", "to", "model_version", "timestamp"}
    click = orjson.loads(json_schemas()["click-event.schema.json"])
    kinds = [alt.get("type") for alt in click["properties"]["timestamp"]["anyOf"]]
    assert kinds == ["integer", "string"]  # epoch ms or ISO-8601

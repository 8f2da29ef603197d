"""A typed reader of what the worker writes to Redis, for services that use segments."""

from __future__ import annotations

from collections.abc import Mapping

import orjson
import redis

from schemas.records import KEY_FORMAT, RedisKeys, SegmentRecord, UserSegment


def text(value: bytes | str | float) -> str:
    """A Redis reply as text, whether the client decodes responses or not."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _text(raw: Mapping[bytes | str, bytes | str]) -> dict[str, str]:
    return {text(k): text(v) for k, v in raw.items()}


class IncompatibleFormat(RuntimeError):
    """Redis holds segments in a key layout this reader does not know."""


class SegmentReader:
    """`SegmentReader(redis.Redis(...)).get("u-42")` -> the user's segment, or None.

    On creation it checks the key-format version the worker wrote (`seg:format`) and
    raises IncompatibleFormat if it is not the one this reader was built for.
    """

    def __init__(self, client: redis.Redis, prefix: str = "seg") -> None:
        self._redis = client
        self._keys = RedisKeys(prefix)
        written = client.get(self._keys.format)
        if written is not None and int(written) != KEY_FORMAT:
            raise IncompatibleFormat(
                f"Redis at prefix {prefix!r} uses key format {int(written)}; this reader "
                f"knows format {KEY_FORMAT}: upgrade the reader"
            )

    def get(self, user_id: str) -> UserSegment | None:
        raw = self._redis.hgetall(self._keys.user(user_id))
        return UserSegment.model_validate(_text(raw)) if raw else None

    def segments(self) -> dict[str, SegmentRecord]:
        """Every live segment by id, ordered by id number."""
        ids = sorted(
            (text(i) for i in self._redis.smembers(self._keys.segments)),
            key=lambda s: (len(s), s),
        )
        pipe = self._redis.pipeline(transaction=False)
        for segment_id in ids:
            pipe.hgetall(self._keys.segment(segment_id))
        records = {}
        for segment_id, raw in zip(ids, pipe.execute(), strict=True):
            if raw:
                fields = _text(raw)
                fields.setdefault("size", "0")
                records[segment_id] = SegmentRecord.model_validate(
                    {**fields, "centroid": orjson.loads(fields["centroid"])}
                )
        return records

    def members(self, segment_id: str, cursor: int = 0, count: int = 500) -> tuple[int, list[str]]:
        """One page of a segment's users: (next cursor, user ids); cursor 0 ends."""
        next_cursor, page = self._redis.zscan(self._keys.members(segment_id), cursor, count=count)
        return int(next_cursor), [text(member) for member, _ in page]

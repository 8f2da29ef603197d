"""JSON Schema files of the wire contract, for producers and consumers in other languages.

`segment-worker export-schemas` writes them to `schemas/json/`; a test keeps the checked-in
files equal to what the pydantic models say.
"""

from __future__ import annotations

from pathlib import Path

import orjson
from pydantic import BaseModel

from schemas.events import ClickEvent, PurchaseEvent, UserDeleted
from schemas.records import SegmentChange, SegmentLifecycle, SegmentRecord, UserSegment

SCHEMA_DIR = Path(__file__).with_name("json")
MODELS: dict[str, type[BaseModel]] = {
    "click-event": ClickEvent,
    "purchase-event": PurchaseEvent,
    "user-deleted-event": UserDeleted,
    "segment-change": SegmentChange,
    "segment-lifecycle": SegmentLifecycle,
    "redis-user-segment": UserSegment,
    "redis-segment": SegmentRecord,
}


def json_schemas() -> dict[str, bytes]:
    """File name -> JSON Schema (2020-12) text of each model, as serialized on the wire."""
    files = {}
    for name, model in MODELS.items():
        schema = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"segment-worker/{name}.schema.json",
            **model.model_json_schema(by_alias=True, mode="validation"),
        }
        files[f"{name}.schema.json"] = orjson.dumps(schema, option=orjson.OPT_INDENT_2) + b"\n"
    return files


def export(directory: Path = SCHEMA_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in json_schemas().items():
        path = directory / name
        path.write_bytes(text)
        written.append(path)
    return written

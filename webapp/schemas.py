"""marshmallow schemas shared by the API: shapes in, shapes out."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import marshmallow as ma
from marshmallow import fields, validate


class Timestamp(fields.DateTime):
    """RFC 3339 in UTC with a `Z`, e.g. 2026-11-27T07:13:18Z."""

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> str | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        text = value.astimezone(UTC).isoformat(timespec="seconds")
        return text.replace("+00:00", "Z")

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> datetime:
        parsed = super()._deserialize(value, attr, data, **kwargs)
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC)


class MeSchema(ma.Schema):
    user_id = fields.Integer(required=True)
    organization_id = fields.Integer(required=True)
    roles = fields.List(fields.String(), required=True)


class PageArgsSchema(ma.Schema):
    """?limit= (default 50, above 500 clamped to 500) and ?cursor=."""

    limit = fields.Integer(load_default=50, validate=validate.Range(min=1))
    cursor = fields.String(load_default=None, validate=validate.Length(max=200))

    @ma.post_load
    def clamp(self, data: dict[str, Any], **_kwargs: Any) -> dict[str, Any]:
        data["limit"] = min(data["limit"], 500)
        return data


def collection_schema(item: type[ma.Schema], name: str) -> type[ma.Schema]:
    """`{"items": [...], "next_cursor": ...}` around an item schema."""
    return ma.Schema.from_dict(
        {
            "items": fields.List(fields.Nested(item), required=True),
            "next_cursor": fields.String(allow_none=True, required=True),
        },
        name=name,
    )

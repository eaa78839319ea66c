"""Keyset pagination: `{"items": [...], "next_cursor": ...}` ordered by id."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from sqlalchemy import Select
from sqlalchemy.orm import InstrumentedAttribute

from webapp.errors import ValidationFailed
from webapp.extensions import db


def encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(f"id:{last_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        prefix, _, value = text.partition(":")
        if prefix != "id" or not value.isdigit():
            raise ValueError(cursor)
        return int(value)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ValidationFailed(fields={"cursor": ["not a cursor this API issued"]}) from None


def paginate(
    query: Select[Any],
    id_column: InstrumentedAttribute[int],
    limit: int,
    cursor: str | None,
    *,
    newest_first: bool = False,
) -> dict[str, Any]:
    if cursor:
        last = decode_cursor(cursor)
        query = query.where(id_column < last if newest_first else id_column > last)
    order = id_column.desc() if newest_first else id_column
    rows = list(db.session.scalars(query.order_by(order).limit(limit + 1)))
    next_cursor = encode_cursor(rows[limit - 1].id) if len(rows) > limit else None
    return {"items": rows[:limit], "next_cursor": next_cursor}

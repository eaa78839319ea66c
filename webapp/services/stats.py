"""Aggregate counts of stored state, by indexed GROUP BY queries (no rows loaded)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import case, func, select

from webapp.extensions import db
from webapp.models import MailAccount, UserEmailToken, utcnow


def derived_token_status(now: datetime):  # type: ignore[no-untyped-def]
    """SQL expression of the reported status: `expired` is active and past expiry."""
    return case(
        (
            (UserEmailToken.status == "active") & (UserEmailToken.expires_at <= now),
            "expired",
        ),
        else_=UserEmailToken.status,
    )


def token_status_counts(organization_id: int | None = None) -> dict[tuple[str, str], int]:
    status = derived_token_status(utcnow())
    query = select(UserEmailToken.provider, status, func.count()).group_by(
        UserEmailToken.provider, status
    )
    if organization_id is not None:
        query = query.where(UserEmailToken.organization_id == organization_id)
    return {(p, s): n for p, s, n in db.session.execute(query)}


def account_status_counts(organization_id: int | None = None) -> dict[str, int]:
    query = select(MailAccount.status, func.count()).group_by(MailAccount.status)
    if organization_id is not None:
        query = query.where(MailAccount.organization_id == organization_id)
    return {s: n for s, n in db.session.execute(query)}

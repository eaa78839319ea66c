"""Organization health: token, refresh and sync figures, computed by aggregate SQL only.

Every figure comes from GROUP BY queries with conditional counts (`count(*) FILTER
(WHERE ...)`), never from rows loaded into Python: whatever the organization's size,
a handful of rows comes back. Counts follow DESIGN.md "Contract details":

- `active` = stored active and not past `expires_at` (no `expires_at` counts as active);
  `expired` = stored active and past it; `total` = active + expired + needs_reauth +
  revoked; `expiring_soon` = active tokens whose `expires_at` falls within the window;
- `refresh_failures_24h` = attempts started in the last 24 h whose outcome is not
  `success`; rates are floats 0..1, or None when nothing was attempted.

PostgreSQL is the production database; SQLite (development) gets equivalent
expressions where the SQL differs (durations, hour buckets, p95).

Exact counts have to visit every row: for an organization with a million tokens that
is several hundred milliseconds however the query is written. So a computation that
took longer than SNAPSHOT_WHEN_SLOWER_THAN over at least SNAPSHOT_MIN_ROWS rows is kept
in Redis for SNAPSHOT_SECONDS and served from there (`generated_at` says when it was
computed). Below that size a slow computation is a hiccup (a new connection, a loaded
machine), not the organization's size, so small organizations always see live figures.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from sqlalchemy import extract, func, literal_column, select

from webapp.extensions import db, redis_store
from webapp.models import MailAccount, SyncRun, TokenRefreshAttempt, UserEmailToken, utcnow
from webapp.providers import PROVIDER_NAMES

log = logging.getLogger("mailkey.health")

SNAPSHOT_SECONDS = 30
SNAPSHOT_WHEN_SLOWER_THAN = 0.1  # seconds: the API's latency target
SNAPSHOT_MIN_ROWS = 10_000  # fewer rows are counted in a few ms: always live
SNAPSHOT_PREFIX = "mailkey:health:"
REFRESH_WINDOW = timedelta(hours=24)
SYNC_WINDOW = timedelta(hours=24)
TOKEN_COUNT_KEYS = ("active", "expired", "needs_reauth", "revoked", "expiring_soon")
P95 = 0.95


def _dialect() -> str:
    return db.engine.dialect.name


def _rate(successes: int, attempts: int) -> float | None:
    return successes / attempts if attempts else None


def _encode(value: Any) -> Any:
    if isinstance(value, datetime):
        return {"$dt": value.isoformat()}
    raise TypeError(f"cannot encode {type(value).__name__}")


def _decode(value: dict[str, Any]) -> Any:
    return datetime.fromisoformat(value["$dt"]) if set(value) == {"$dt"} else value


def _snapshot(
    key: str, compute: Callable[[], dict[str, Any]], rows: Callable[[dict[str, Any]], int]
) -> dict[str, Any]:
    """`compute()`, or its recent result when computing it was slow over many rows
    (`rows(result)`, see the module doc).

    Redis trouble only costs the cache: the figures are then computed every time.
    """
    key = SNAPSHOT_PREFIX + key
    try:
        cached = redis_store.client.get(key)
    except redis.RedisError:
        cached = None
    if cached is not None:
        return json.loads(cached, object_hook=_decode)
    started = time.perf_counter()
    result = compute()
    elapsed = time.perf_counter() - started
    if elapsed >= SNAPSHOT_WHEN_SLOWER_THAN and rows(result) >= SNAPSHOT_MIN_ROWS:
        try:
            redis_store.client.set(key, json.dumps(result, default=_encode), ex=SNAPSHOT_SECONDS)
        except redis.RedisError:
            log.warning("health_snapshot_not_stored", extra={"event": "health_snapshot_not_stored"})
        log.info(
            "health_snapshot",
            extra={"event": "health_snapshot", "key": key, "ms": round(elapsed * 1000, 1)},
        )
    return result


# --- OAuth tokens -------------------------------------------------------------------------


def _empty_provider_counts() -> dict[str, Any]:
    return {
        "total": 0,
        **dict.fromkeys(TOKEN_COUNT_KEYS, 0),
        "refresh_attempts_24h": 0,
        "refresh_failures_24h": 0,
        "refresh_success_rate_24h": None,
    }


def oauth_token_health(organization_id: int, within_hours: int = 24) -> dict[str, Any]:
    """Token counts by derived status and refresh figures of the last 24 h, per provider."""
    return _snapshot(
        f"oauth-tokens:{organization_id}:{within_hours}",
        lambda: compute_oauth_token_health(organization_id, within_hours),
        lambda figures: figures["total"] + figures["refresh_attempts_24h"],
    )


def compute_oauth_token_health(organization_id: int, within_hours: int = 24) -> dict[str, Any]:
    """Two queries: one over the organization's tokens, one over its refresh attempts
    started in the last 24 h (index ix_token_refresh_attempts_org_started)."""
    now = utcnow()
    soon = now + timedelta(hours=within_hours)
    token = UserEmailToken
    # One pass, three cheap aggregates per (status, provider): the counts per stored
    # status, and for stored-active rows how many are past expiry or expire in the
    # window (NULL `expires_at` is in neither, so it stays active).
    token_rows = db.session.execute(
        select(
            token.status,
            token.provider,
            func.count(),
            func.count().filter(token.expires_at <= now),
            func.count().filter((token.expires_at > now) & (token.expires_at <= soon)),
        )
        .where(token.organization_id == organization_id)
        .group_by(token.status, token.provider)
    ).all()

    attempt = TokenRefreshAttempt
    attempt_rows = db.session.execute(
        select(
            attempt.provider,
            func.count(),
            func.count().filter(attempt.outcome != "success"),
        )
        .where(
            attempt.organization_id == organization_id,
            attempt.started_at >= now - REFRESH_WINDOW,
        )
        .group_by(attempt.provider)
    ).all()

    # Every registry provider is listed; a provider name found only in stored rows
    # (a provider since removed from the registry) is listed too, so the per-provider
    # figures always add up to the totals.
    by_provider = {name: _empty_provider_counts() for name in PROVIDER_NAMES}
    for status, provider, count, past_expiry, in_window in token_rows:
        entry = by_provider.setdefault(provider, _empty_provider_counts())
        if status == "active":
            entry["active"] += count - past_expiry
            entry["expired"] += past_expiry
            entry["expiring_soon"] += in_window
        elif status in ("needs_reauth", "revoked"):
            entry[status] += count
    for provider, attempts, failures in attempt_rows:
        entry = by_provider.setdefault(provider, _empty_provider_counts())
        entry["refresh_attempts_24h"] = attempts
        entry["refresh_failures_24h"] = failures

    summed = ("total", *TOKEN_COUNT_KEYS, "refresh_attempts_24h", "refresh_failures_24h")
    totals = dict.fromkeys(summed, 0)
    for entry in by_provider.values():
        entry["total"] = sum(entry[key] for key in ("active", "expired", "needs_reauth", "revoked"))
        entry["refresh_success_rate_24h"] = _rate(
            entry["refresh_attempts_24h"] - entry["refresh_failures_24h"],
            entry["refresh_attempts_24h"],
        )
        for key in summed:
            totals[key] += entry[key]

    return {
        **totals,
        "expiring_soon_window_hours": within_hours,
        "refresh_success_rate_24h": _rate(
            totals["refresh_attempts_24h"] - totals["refresh_failures_24h"],
            totals["refresh_attempts_24h"],
        ),
        "by_provider": by_provider,
        "generated_at": now,
    }


# --- email sync ---------------------------------------------------------------------------


def _duration_seconds() -> Any:
    """SQL seconds between a run's start and finish (NULL while it runs)."""
    if _dialect() == "postgresql":
        return extract("epoch", SyncRun.finished_at - SyncRun.started_at)
    return (func.julianday(SyncRun.finished_at) - func.julianday(SyncRun.started_at)) * 86400.0


def _seconds(value: Any) -> float | None:
    return None if value is None else round(float(value), 3)


def email_sync_health(organization_id: int) -> dict[str, Any]:
    """Account statuses, and runs started in the last 24 h: outcomes, durations, messages."""
    return _snapshot(
        f"email-sync:{organization_id}",
        lambda: compute_email_sync_health(organization_id),
        lambda figures: figures["accounts"]["total"] + figures["sync_runs_24h"]["total"],
    )


def compute_email_sync_health(organization_id: int) -> dict[str, Any]:
    """Two queries (three on SQLite).

    The success rate is succeeded / (succeeded + failed): runs still running are left
    out. Durations cover finished runs (succeeded or failed). p95 is PostgreSQL's
    `percentile_cont(0.95)` (interpolated); SQLite has no percentile function, so
    there the finished durations alone are fetched, ordered, and the nearest-rank
    value is taken (the two can differ slightly on small samples).
    """
    now = utcnow()
    account = MailAccount
    accounts = db.session.execute(
        select(
            func.count(),
            func.count().filter(account.status == "active"),
            func.count().filter(account.status == "error"),
            func.count().filter(account.status == "paused"),
        ).where(account.organization_id == organization_id)
    ).one()

    run = SyncRun
    in_window = (run.organization_id == organization_id) & (run.started_at >= now - SYNC_WINDOW)
    duration = _duration_seconds()
    columns = [
        func.count(),
        func.count().filter(run.outcome == "succeeded"),
        func.count().filter(run.outcome == "failed"),
        func.avg(duration),
        func.coalesce(func.sum(run.new_count), 0),
    ]
    postgres = _dialect() == "postgresql"
    if postgres:
        columns.append(func.percentile_cont(P95).within_group(duration))
    figures = db.session.execute(select(*columns).where(in_window)).one()
    total, succeeded, failed, average, messages = figures[:5]
    p95 = figures[5] if postgres else _nearest_rank_p95(in_window, duration)

    return {
        "accounts": {
            "total": accounts[0],
            "active": accounts[1],
            "error": accounts[2],
            "paused": accounts[3],
        },
        "sync_runs_24h": {"total": total, "succeeded": succeeded, "failed": failed},
        "success_rate_24h": _rate(succeeded, succeeded + failed),
        "avg_duration_seconds": _seconds(average),
        "p95_duration_seconds": _seconds(p95),
        "messages_synced_24h": int(messages),
        "generated_at": now,
    }


def _nearest_rank_p95(in_window: Any, duration: Any) -> float | None:
    """SQLite only: the nearest-rank 95th percentile of finished runs' durations."""
    values = db.session.scalars(
        select(duration).where(in_window, SyncRun.finished_at.is_not(None)).order_by(duration)
    ).all()
    if not values:
        return None
    return values[math.ceil(P95 * len(values)) - 1]


# --- timeline -----------------------------------------------------------------------------


def _hour_bucket(column: Any) -> Any:
    """SQL start of the UTC hour holding `column`."""
    if _dialect() == "postgresql":
        return func.date_trunc(
            literal_column("'hour'"), func.timezone(literal_column("'UTC'"), column)
        )
    return func.strftime(literal_column("'%Y-%m-%d %H:00:00'"), column)


def _as_hour(value: Any) -> datetime:
    if isinstance(value, str):
        value = datetime.strptime(value, "%Y-%m-%d %H:%M:%S")
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def timeline(organization_id: int, hours: int = 24) -> dict[str, Any]:
    """Hourly refresh and sync outcomes, oldest first: `hours` buckets, the last one the
    current hour, empty hours included with empty maps."""
    return _snapshot(
        f"timeline:{organization_id}:{hours}",
        lambda: compute_timeline(organization_id, hours),
        lambda figures: sum(
            sum(bucket["refresh"].values()) + sum(bucket["sync"].values())
            for bucket in figures["buckets"]
        ),
    )


def compute_timeline(organization_id: int, hours: int = 24) -> dict[str, Any]:
    current = utcnow().replace(minute=0, second=0, microsecond=0)
    first = current - timedelta(hours=hours - 1)
    starts = [first + timedelta(hours=i) for i in range(hours)]
    buckets: dict[datetime, dict[str, Any]] = {
        start: {"start": start, "refresh": {}, "sync": {}} for start in starts
    }
    sources = (
        ("refresh", TokenRefreshAttempt),
        ("sync", SyncRun),
    )
    for key, model in sources:
        hour = _hour_bucket(model.started_at).label("hour")
        rows = db.session.execute(
            select(hour, model.outcome, func.count())
            .where(model.organization_id == organization_id, model.started_at >= first)
            .group_by(hour, model.outcome)
        )
        for value, outcome, count in rows:
            bucket = buckets.get(_as_hour(value))
            if bucket is not None:  # a clock-skewed row from the future is left out
                bucket[key][outcome] = count
    return {"buckets": list(buckets.values())}

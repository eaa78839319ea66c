"""Token refresh tasks: the per-token task and the beat fan-outs that feed it."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from celery import shared_task
from flask import current_app
from sqlalchemy import func, or_, select

from webapp.errors import (
    NeedsReauth,
    NotFound,
    ProviderConfigError,
    ProviderUnavailable,
    TokenRevoked,
)
from webapp.extensions import db, redis_store
from webapp.metrics import FANOUT_SIZE
from webapp.models import UserEmailToken, utcnow
from webapp.services import tokens as token_service

log = logging.getLogger("mailkey.tasks.refresh")

QUEUED_KEY = "mailkey:refresh:queued:{}"
QUEUED_TTL = 300  # a marker lost with a killed worker frees its token within 5 minutes
FANOUT_BATCH = 25  # tokens per fan-out task
RETRY_BASE = 2
RETRY_CAP = 300  # far below the broker's visibility_timeout (3600 s)


def retry_countdown(retries: int, retry_after: float | None) -> float:
    """2, 4, 8 s, or the provider's Retry-After when longer (capped)."""
    backoff = RETRY_BASE * (2**retries)
    return float(min(RETRY_CAP, max(backoff, retry_after or 0)))


def _requested_at(value: str | None) -> datetime | None:
    """The time the refresh was first queued (ISO 8601, as JSON carries it), if known."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _refresh_once(
    token_id: int, force: bool, requested_at: str | None = None
) -> tuple[dict[str, Any], ProviderUnavailable | None]:
    """One attempt; the outcome, and the transient error when it is worth a retry."""
    ahead = timedelta(seconds=current_app.config["REFRESH_AHEAD_SECONDS"])
    try:
        result = token_service.refresh_token(
            token_id,
            trigger="task",
            force=force,
            ahead=max(ahead, token_service.MIN_VALIDITY),
            requested_at=_requested_at(requested_at),
        )
    except ProviderUnavailable as exc:
        return {"token_id": token_id, "outcome": "transient_error", "reason": exc.reason}, exc
    except (NeedsReauth, TokenRevoked) as exc:
        outcome: dict[str, Any] = {"outcome": exc.code, "reason": exc.reason}
    except ProviderConfigError as exc:
        outcome = {"outcome": "config_error", "reason": exc.reason}
    except NotFound:
        outcome = {"outcome": "not_found"}
    else:
        outcome = {"outcome": "refreshed" if result.refreshed else "skipped"}
    _clear_marker(token_id)
    return {"token_id": token_id, **outcome}, None


@shared_task(bind=True, max_retries=3, acks_late=True)
def refresh_token(
    self: Any, token_id: int, force: bool = False, requested_at: str | None = None
) -> dict[str, Any]:
    """Refresh one token if it is due (or always with force). Idempotent: a rerun of a
    finished refresh finds the token fresh and skips, and so does a forced one given
    `requested_at` (when it was queued, ISO 8601) once the token was refreshed since.
    Transient provider errors retry after 2, 4 and 8 s (or the provider's longer
    Retry-After); others end the task."""
    outcome, transient = _refresh_once(token_id, force, requested_at)
    if transient is None:
        return outcome
    if self.request.retries >= self.max_retries:
        _clear_marker(token_id)
        log.warning(
            "refresh_gave_up",
            extra={"event": "refresh_gave_up", "token_id": token_id, "reason": transient.reason},
        )
        return outcome
    retry_after = getattr(transient, "provider_retry_after", None)
    raise self.retry(
        exc=transient, countdown=retry_countdown(self.request.retries, retry_after)
    ) from None


@shared_task(acks_late=True)
def refresh_tokens(
    token_ids: list[int], force: bool = False, requested_at: str | None = None
) -> dict[str, int]:
    """Fan-out batch: refresh each token in turn, under the same per-token lock. A token
    that fails transiently is handed to `refresh_token` as its first retry (after 2 s,
    then 4 and 8), so the retry rule is the single task's. A batch run again after its
    worker died skips the tokens it already refreshed, forced ones included."""
    counts: dict[str, int] = {}
    for token_id in token_ids:
        outcome, transient = _refresh_once(token_id, force, requested_at)
        counts[outcome["outcome"]] = counts.get(outcome["outcome"], 0) + 1
        if transient is not None:
            retry_after = getattr(transient, "provider_retry_after", None)
            refresh_token.apply_async(
                args=[token_id, force, requested_at],
                countdown=retry_countdown(0, retry_after),
                retries=1,
                ignore_result=True,
            )
    return counts


def _clear_marker(token_id: int) -> None:
    redis_store.client.delete(QUEUED_KEY.format(token_id))


def enqueue_refreshes(token_ids: list[int], *, force: bool, task_name: str) -> int:
    """Enqueue each token at most once while a marker says it is queued or in flight,
    spread over time so thousands do not hit the provider in the same second."""
    rate = max(1, current_app.config["REFRESH_FANOUT_RATE"])
    client = redis_store.client
    pipe = client.pipeline()
    for token_id in token_ids:
        pipe.set(QUEUED_KEY.format(token_id), "1", nx=True, ex=QUEUED_TTL)
    claimed = [tid for tid, ok in zip(token_ids, pipe.execute(), strict=True) if ok]
    # One clock for the whole spread, batches of FANOUT_BATCH tokens per task (cheap to
    # send at fleet scale), and no stored result: nobody reads it.
    start = datetime.now(UTC)
    for index in range(0, len(claimed), FANOUT_BATCH):
        refresh_tokens.apply_async(
            args=[claimed[index : index + FANOUT_BATCH], force, start.isoformat()],
            eta=start + timedelta(seconds=index / rate),
            ignore_result=True,
        )
    FANOUT_SIZE.labels(task=task_name).observe(len(claimed))
    log.info(
        "refresh_fanout",
        extra={
            "event": "refresh_fanout",
            "task": task_name,
            "due": len(token_ids),
            "enqueued": len(claimed),
        },
    )
    return len(claimed)


@shared_task(acks_late=True)
def refresh_expiring_tokens() -> int:
    """Beat: every active token expiring within REFRESH_AHEAD_SECONDS (expired included)."""
    horizon = utcnow() + timedelta(seconds=current_app.config["REFRESH_AHEAD_SECONDS"])
    ids = list(
        db.session.scalars(
            select(UserEmailToken.id)
            .where(UserEmailToken.status == "active")
            .where(UserEmailToken.refresh_token_encrypted.is_not(None))
            .where(UserEmailToken.expires_at <= horizon)
            .order_by(UserEmailToken.expires_at)
        )
    )
    return enqueue_refreshes(ids, force=False, task_name="refresh_expiring_tokens")


@shared_task(acks_late=True)
def keep_tokens_alive() -> int:
    """Beat (daily): refresh tokens unused and unrefreshed for KEEPALIVE_DAYS, since
    Microsoft refresh tokens die after 90 idle days and Google's after six months."""
    cutoff = utcnow() - timedelta(days=current_app.config["KEEPALIVE_DAYS"])
    last_activity = func.coalesce(
        UserEmailToken.last_used_at, UserEmailToken.last_refreshed_at, UserEmailToken.created_at
    )
    ids = list(
        db.session.scalars(
            select(UserEmailToken.id)
            .where(UserEmailToken.status == "active")
            .where(UserEmailToken.refresh_token_encrypted.is_not(None))
            .where(or_(UserEmailToken.last_used_at.is_(None), UserEmailToken.last_used_at < cutoff))
            .where(
                or_(
                    UserEmailToken.last_refreshed_at.is_(None),
                    UserEmailToken.last_refreshed_at < cutoff,
                )
            )
            .where(last_activity < cutoff)
        )
    )
    return enqueue_refreshes(ids, force=True, task_name="keep_tokens_alive")

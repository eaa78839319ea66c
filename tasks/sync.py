"""Mail tasks: sync one account, fan out due syncs, send one message."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from celery import shared_task
from flask import current_app
from sqlalchemy import or_, select
from sqlalchemy.orm.exc import ObjectDeletedError

from tasks.refresh import RETRY_CAP, retry_countdown
from webapp.extensions import db, redis_store
from webapp.metrics import FANOUT_SIZE
from webapp.models import MailAccount, utcnow
from webapp.services import send as send_service
from webapp.services import sync as sync_service

log = logging.getLogger("mailkey.tasks.sync")
QUEUED_KEY = "mailkey:sync:queued:{}"
QUEUED_TTL = 1800  # frees an account whose queued task was lost with a killed worker


@shared_task(bind=True, max_retries=3, acks_late=True, soft_time_limit=1500, time_limit=1800)
def sync_account(self: Any, account_id: int, run_id: int | None = None) -> dict[str, Any]:
    """Sync one account; network and temporary server errors retry after 2, 4, 8 s.
    The beat marker is cleared however the task ends, unless a retry is pending: a
    crash must not keep the account out of the schedule for QUEUED_TTL."""
    retrying = False
    try:
        run = sync_service.sync_account(account_id, run_id)
    except sync_service.SyncBusy:
        return {"account_id": account_id, "outcome": "busy"}
    except (LookupError, ObjectDeletedError):
        # The account was deleted before or during the sync.
        db.session.rollback()
        return {"account_id": account_id, "outcome": "not_found"}
    except sync_service.TransientSyncError as exc:
        if self.request.retries >= self.max_retries:
            return {"account_id": account_id, "outcome": "failed", "error": str(exc)}
        retrying = True
        raise self.retry(exc=exc, countdown=retry_countdown(self.request.retries, None)) from None
    finally:
        if not retrying:
            redis_store.client.delete(QUEUED_KEY.format(account_id))
    db.session.refresh(run)
    return {
        "account_id": account_id,
        "run_id": run.id,
        "outcome": run.outcome,
        "new": run.new_count,
        "updated": run.updated_count,
        "deleted": run.deleted_count,
    }


@shared_task(acks_late=True)
def sync_due_accounts() -> int:
    """Beat: enabled active accounts not synced for SYNC_INTERVAL_SECONDS, and accounts in
    `error` every SYNC_ERROR_RETRY_SECONDS (an outage heals by itself). Paused ones wait."""
    now = utcnow()
    due = now - timedelta(seconds=current_app.config["SYNC_INTERVAL_SECONDS"])
    error_due = now - timedelta(seconds=current_app.config["SYNC_ERROR_RETRY_SECONDS"])
    ids = list(
        db.session.scalars(
            select(MailAccount.id)
            .where(MailAccount.sync_enabled.is_(True))
            .where(
                or_(
                    (MailAccount.status == "active")
                    & (MailAccount.last_synced_at.is_(None) | (MailAccount.last_synced_at < due)),
                    (MailAccount.status == "error") & (MailAccount.updated_at < error_due),
                )
            )
        )
    )
    pipe = redis_store.client.pipeline()
    for account_id in ids:
        pipe.set(QUEUED_KEY.format(account_id), "1", nx=True, ex=QUEUED_TTL)
    claimed = [aid for aid, ok in zip(ids, pipe.execute(), strict=True) if ok]
    for account_id in claimed:
        sync_account.delay(account_id)
    FANOUT_SIZE.labels(task="sync_due_accounts").observe(len(claimed))
    return len(claimed)


@shared_task(bind=True, max_retries=3, acks_late=True)
def send_message(self: Any, send_id: int) -> dict[str, Any]:
    """Send one queued message; a message already sent is never sent again."""
    try:
        send = send_service.deliver(send_id)
    except send_service.TransientSendError as exc:
        if self.request.retries >= self.max_retries:
            send_service.give_up(send_id, str(exc))
            return {"send_id": send_id, "status": "failed"}
        raise self.retry(exc=exc, countdown=retry_countdown(self.request.retries, None)) from None
    if send is None:
        # Another worker holds the send lock: a live one finishes the send, a killed one
        # (whose task this may be, redelivered) left the lock to run out. Come back when
        # it has: the send is then done, or still queued and this task sends it. Ending
        # here would leave a killed worker's message queued forever.
        remaining_ms = redis_store.client.pttl(send_service.SEND_LOCK_KEY.format(send_id))
        if remaining_ms < 0:  # no lock held: the send row itself is gone (account deleted)
            return {"send_id": send_id, "status": "not_found"}
        countdown = min(RETRY_CAP, max(1.0, remaining_ms / 1000 + 1))
        send_message.apply_async(args=[send_id], countdown=countdown)
        return {"send_id": send_id, "status": "busy"}
    return {"send_id": send_id, "status": send.status}

"""Fixtures shared by the integration tests: a connected, synced mailbox on Dovecot."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from tests.support.flows import connect
from webapp.extensions import db
from webapp.models import SyncRun


def finished_runs(account_id: int) -> list[SyncRun]:
    db.session.expire_all()
    return list(
        db.session.scalars(
            sa.select(SyncRun)
            .where(SyncRun.account_id == account_id, SyncRun.outcome != "running")
            .order_by(SyncRun.id)
        )
    )


def wait_runs(account_id: int, count: int, timeout: float = 40) -> list[SyncRun]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = finished_runs(account_id)
        if len(runs) >= count:
            return runs
        time.sleep(0.1)
    raise AssertionError(f"expected {count} finished sync runs, got {finished_runs(account_id)}")


@pytest.fixture
def mailbox(client, auth_headers, oauth_provider, mail, celery_worker):
    """alice@example.com with 30 messages, connected through OAuth and initially synced."""
    address = f"alice-{time.monotonic_ns()}@example.com"
    mail.imap.seed(address, "INBOX", 30)
    response = connect(client, auth_headers(), "google", oauth_provider, address)
    assert response.status_code == 201, response.json
    account_id = response.json["account_id"]
    first = wait_runs(account_id, 1)[0]
    assert first.outcome == "succeeded", first.error
    return {
        "address": address,
        "account_id": account_id,
        "token_id": response.json["id"],
        "run": first,
    }

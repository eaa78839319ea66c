"""Fixtures shared by the integration tests: a connected, synced mailbox on Dovecot,
a password account on it, a way to make a sync fail at a chosen batch, and the token
row and "refresh now" call the token tests share."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable

import pytest
import sqlalchemy as sa

from tests.support.flows import connect
from webapp.crypto import encrypt_field
from webapp.extensions import db
from webapp.models import MailAccount, OutboundMessage, SyncRun, UserEmailToken
from webapp.services import sync as sync_service
from webapp.services.keys import account_password_aad, payload_aad


def finished_runs(account_id: int) -> list[SyncRun]:
    db.session.expire_all()
    return list(
        db.session.scalars(
            sa.select(SyncRun)
            .where(SyncRun.account_id == account_id, SyncRun.outcome != "running")
            .order_by(SyncRun.id)
        )
    )


def token_row(token_id: int) -> UserEmailToken:
    """The token as stored now (nothing cached from earlier reads)."""
    db.session.expire_all()
    return db.session.get(UserEmailToken, token_id)


def refresh_now(client, headers, token_id: int):
    return client.post(f"/api/v1/oauth/tokens/{token_id}/refresh", headers=headers)


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


_users = itertools.count()


def password_account(mail, user: str, password: str, **fields) -> MailAccount:
    """A password account on the session's Dovecot and SMTP server, stored directly."""
    account = MailAccount(
        organization_id=1, user_id=1, email_address=user, provider="custom",
        incoming_auth_method="password", incoming_server=mail.imap.host,
        incoming_port=mail.imap.imaps_port, incoming_security="ssl", username=user,
        outgoing_server=mail.smtp.host, outgoing_port=mail.smtp.port,
        outgoing_security="starttls", sync_enabled=False, status="active",
    )  # fmt: skip
    for name, value in fields.items():
        setattr(account, name, value)
    account.password_encrypted = encrypt_field(password, "pii", account_password_aad(account))
    db.session.add(account)
    db.session.commit()
    return account


@pytest.fixture
def imap_account(app, mail):
    """(address, account): a fresh Dovecot user with a password account for it."""
    user = f"odd-{next(_users)}-{id(mail)}@example.com"
    mail.imap.set_password_user(user, "odd-secret")
    return user, password_account(mail, user, "odd-secret")


def fail_at_batch(monkeypatch, batch: int, action: Callable[[], None]) -> Callable[[], None]:
    """Make the sync run `action` (kick the connection, raise ...) just before it sends
    the FETCH of its `batch`-th batch (the rows of the batch before that one are not yet
    handed to the writer then); returns the function that puts the real request back."""
    request_new = sync_service.request_new
    batches: list[list[int]] = []

    def request(client, uids):
        batches.append(uids)
        if len(batches) == batch:
            action()
        return request_new(client, uids)

    monkeypatch.setattr(sync_service, "request_new", request)
    return lambda: monkeypatch.setattr(sync_service, "request_new", request_new)


def queued_send(request: dict, *, aad_send_id: int | None = None) -> OutboundMessage:
    """A send waiting in the outbox of a fresh account, its message encrypted as
    queue_send does (for `aad_send_id` instead of its own id, to make it unreadable)."""
    account = MailAccount(
        organization_id=1, user_id=1, email_address=f"queue-{next(_users)}@example.com",
        provider="custom", incoming_auth_method="password",
        incoming_server="imap.example.com", incoming_port=993,
    )  # fmt: skip
    db.session.add(account)
    db.session.flush()
    send = OutboundMessage(
        account_id=account.id,
        organization_id=1,
        message_id=f"<queued-{account.id}@example.com>",
        status="queued",
    )
    db.session.add(send)
    db.session.flush()
    aad = payload_aad(send.id if aad_send_id is None else aad_send_id)
    send.payload_encrypted = encrypt_field(json.dumps(request), "pii", aad)
    db.session.commit()
    return send

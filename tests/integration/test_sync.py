"""Sync and send against a real Dovecot and SMTP server, XOAUTH2 checked against the
local OAuth provider, on a real Celery worker."""

from __future__ import annotations

import signal
import time
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from celery.exceptions import SoftTimeLimitExceeded

from tests.conftest import PASSWORD, PASSWORD_USER, make_app
from tests.integration.conftest import finished_runs as _finished_runs
from tests.integration.conftest import wait_runs as _wait_runs
from webapp.extensions import db
from webapp.models import (
    MailAccount,
    MailMessage,
    OutboundMessage,
    SyncRun,
    TokenRefreshAttempt,
    UserEmailToken,
    utcnow,
)

pytestmark = pytest.mark.usefixtures("celery_worker")


def _sync(client, headers, account_id: int) -> SyncRun:
    before = len(_finished_runs(account_id))
    response = client.post(f"/api/v1/accounts/{account_id}/sync", headers=headers)
    assert response.status_code == 202, response.json
    run_id = response.json["sync_run_id"]
    runs = _wait_runs(account_id, before + 1)
    assert runs[-1].id == run_id
    return runs[-1]


def _messages(account_id: int) -> int:
    db.session.expire_all()
    return db.session.scalar(
        sa.select(sa.func.count())
        .select_from(MailMessage)
        .where(MailMessage.account_id == account_id)
    )


def test_initial_sync_stores_envelopes_and_encrypted_snippets(client, auth_headers, mailbox):
    run = mailbox["run"]
    assert run.new_count == 30 and run.deleted_count == 0
    account_id = mailbox["account_id"]
    assert _messages(account_id) == 30
    folders = client.get(f"/api/v1/accounts/{account_id}/folders", headers=auth_headers()).json
    names = {folder["name"] for folder in folders["items"]}
    assert {"INBOX", "Sent", "Trash"} <= names
    page = client.get(
        f"/api/v1/accounts/{account_id}/messages?folder=INBOX&limit=10", headers=auth_headers()
    ).json
    assert len(page["items"]) == 10 and page["next_cursor"]
    message = page["items"][0]
    assert message["subject"].startswith("Seed message")
    assert message["from_address"] and message["to_addresses"]
    assert message["sent_at"].endswith("Z") and message["size"] > 1000
    assert message["snippet"]
    stored = db.session.scalars(sa.select(MailMessage).limit(1)).one()
    assert stored.snippet_encrypted.startswith("v1:")
    assert message["snippet"][:20] not in stored.snippet_encrypted
    account = db.session.get(MailAccount, account_id)
    assert account.status == "active" and account.last_synced_at is not None


def test_unchanged_mailbox_changes_nothing(client, auth_headers, mailbox):
    run = _sync(client, auth_headers(), mailbox["account_id"])
    assert run.outcome == "succeeded"
    assert (run.new_count, run.updated_count, run.deleted_count) == (0, 0, 0)


def test_new_mail_flags_and_expunge_are_picked_up(client, auth_headers, mailbox, mail):
    account_id, address = mailbox["account_id"], mailbox["address"]
    mail.imap.seed(address, "INBOX", 5, subject_prefix="Fresh")
    run = _sync(client, auth_headers(), account_id)
    assert run.new_count == 5 and _messages(account_id) == 35

    uids = sorted(mail.imap.fetch_uids(address, "INBOX"))
    mail.imap.add_flags(address, "INBOX", uids[:3], [b"\\Seen"])
    run = _sync(client, auth_headers(), account_id)
    assert run.updated_count == 3 and run.new_count == 0
    flags = db.session.scalars(
        sa.select(MailMessage.flags).where(MailMessage.uid.in_(uids[:3]))
    ).all()
    assert all("\\Seen" in f for f in flags)

    mail.imap.expunge(address, "INBOX", uids[-4:])
    run = _sync(client, auth_headers(), account_id)
    assert run.deleted_count == 4 and _messages(account_id) == 31


def test_uidvalidity_change_resyncs_the_folder_without_duplicates(
    client, auth_headers, mailbox, mail
):
    account_id, address = mailbox["account_id"], mailbox["address"]
    mail.imap.reset_uidvalidity(address, "INBOX")
    run = _sync(client, auth_headers(), account_id)
    assert run.outcome == "succeeded"
    assert run.deleted_count == 30 and run.new_count == 30
    assert _messages(account_id) == 30
    message_ids = db.session.scalars(sa.select(MailMessage.message_id)).all()
    assert len(message_ids) == len(set(message_ids))


def test_expired_token_is_refreshed_before_connecting(
    client, auth_headers, mailbox, oauth_provider
):
    db.session.execute(sa.update(UserEmailToken).values(expires_at=utcnow() - timedelta(minutes=1)))
    db.session.commit()
    oauth_provider.expire_all_access_tokens()
    calls = oauth_provider.calls["token"]
    run = _sync(client, auth_headers(), mailbox["account_id"])
    assert run.outcome == "succeeded", run.error
    assert oauth_provider.calls["token"] == calls + 1


def test_rejected_access_token_is_retried_once_after_a_forced_refresh(
    client, auth_headers, mailbox, oauth_provider
):
    oauth_provider.expire_all_access_tokens()  # still "valid" in Mailkey's eyes
    calls = oauth_provider.calls["token"]
    run = _sync(client, auth_headers(), mailbox["account_id"])
    assert run.outcome == "succeeded", run.error
    assert oauth_provider.calls["token"] == calls + 1


def test_revoked_grant_pauses_the_account_without_a_retry_loop(
    client, auth_headers, mailbox, oauth_provider
):
    oauth_provider.revoke_grant_for(mailbox["address"])
    run = _sync(client, auth_headers(), mailbox["account_id"])
    assert run.outcome == "failed"
    time.sleep(3)  # a retry would have happened after 2 s
    assert len(_finished_runs(mailbox["account_id"])) == 2
    account = db.session.get(MailAccount, mailbox["account_id"])
    token = db.session.get(UserEmailToken, mailbox["token_id"])
    assert account.status == "paused"
    assert token.status == "needs_reauth"
    attempts = db.session.scalars(sa.select(TokenRefreshAttempt.outcome)).all()
    assert attempts == ["permanent_error"]


def test_server_down_is_retried_and_heals(client, auth_headers, mailbox, mail):
    account_id = mailbox["account_id"]
    mail.imap.seed(mailbox["address"], "INBOX", 2)
    mail.imap.stop_temporarily()
    try:
        response = client.post(f"/api/v1/accounts/{account_id}/sync", headers=auth_headers())
        assert response.status_code == 202
        failed = _wait_runs(account_id, 2)[-1]
        assert failed.outcome == "failed"
        assert db.session.get(MailAccount, account_id).status == "error"
    finally:
        mail.imap.restart()
    healed = _wait_runs(account_id, 3, timeout=30)[-1]
    assert healed.outcome == "succeeded" and healed.new_count == 2
    assert db.session.get(MailAccount, account_id).status == "active"


def test_send_with_xoauth2_once_per_idempotency_key(client, auth_headers, mailbox, mail):
    account_id = mailbox["account_id"]
    body = {"to": ["bob@example.com"], "subject": "Hello", "text": "Hi Bob", "html": "<p>Hi</p>"}
    headers = {**auth_headers(), "Idempotency-Key": "send-1"}
    first = client.post(f"/api/v1/accounts/{account_id}/send", json=body, headers=headers)
    assert first.status_code == 202 and first.json["status"] == "queued"
    replay = client.post(f"/api/v1/accounts/{account_id}/send", json=body, headers=headers)
    assert replay.status_code == 202 and replay.json["send_id"] == first.json["send_id"]
    messages = mail.smtp.wait_for_messages(1, timeout=20)
    time.sleep(1)
    assert len(mail.smtp.messages) == 1
    assert messages[0]["auth_user"] == mailbox["address"]
    assert b"Subject: Hello" in messages[0]["data"]
    status_url = f"/api/v1/accounts/{account_id}/sends/{first.json['send_id']}"
    deadline = time.monotonic() + 10
    while client.get(status_url, headers=auth_headers()).json["status"] == "queued":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert client.get(status_url, headers=auth_headers()).json["status"] == "sent"
    row = db.session.get(OutboundMessage, first.json["send_id"])
    assert row.payload_encrypted is None
    bad = client.post(
        f"/api/v1/accounts/{account_id}/send", json={"subject": "x"}, headers=auth_headers()
    )
    assert bad.status_code == 422 and "to" in bad.json["error"]["fields"]


def test_password_account_is_tried_before_it_is_saved(client, auth_headers, mail):
    base = {
        "email_address": PASSWORD_USER,
        "imap_host": mail.imap.host,
        "imap_port": mail.imap.imaps_port,
        "smtp_host": mail.smtp.host,
        "smtp_port": mail.smtp.port,
    }
    wrong = client.post(
        "/api/v1/accounts", json={**base, "password": "nope"}, headers=auth_headers()
    )
    assert wrong.status_code == 422
    assert wrong.json["error"]["code"] == "mail_server_rejected"
    assert db.session.scalar(sa.select(sa.func.count()).select_from(MailAccount)) == 0
    response = client.post(
        "/api/v1/accounts", json={**base, "password": PASSWORD}, headers=auth_headers()
    )
    assert response.status_code == 201, response.json
    account = response.json
    assert "password" not in account and account["incoming_auth_method"] == "password"
    stored = db.session.get(MailAccount, account["id"])
    assert stored.password_encrypted.startswith("v1:") and PASSWORD not in stored.password_encrypted
    run = _wait_runs(account["id"], 1)[0]
    assert run.outcome == "succeeded", run.error
    assert (
        client.get(f"/api/v1/accounts/{account['id']}", headers=auth_headers(2, 1)).status_code
        == 404
    )
    patched = client.patch(
        f"/api/v1/accounts/{account['id']}", json={"sync_enabled": False}, headers=auth_headers()
    )
    assert patched.status_code == 200 and patched.json["sync_enabled"] is False
    deleted = client.delete(f"/api/v1/accounts/{account['id']}", headers=auth_headers())
    assert deleted.status_code == 204


def test_an_account_created_with_sync_disabled_is_not_synced(
    client, auth_headers, mail, monkeypatch
):
    from webapp.services import accounts as accounts_service

    queued: list[tuple] = []
    monkeypatch.setattr(accounts_service, "enqueue", lambda *args: queued.append(args))
    body = {
        "email_address": PASSWORD_USER, "password": PASSWORD, "sync_enabled": False,
        "imap_host": mail.imap.host, "imap_port": mail.imap.imaps_port,
    }  # fmt: skip
    response = client.post("/api/v1/accounts", json=body, headers=auth_headers())
    assert response.status_code == 201, response.json
    assert response.json["sync_enabled"] is False and queued == []


def test_private_hosts_and_odd_ports_are_refused_when_not_allowed(base_env, make_token):
    app = make_app(base_env, MAIL_ALLOW_PRIVATE_HOSTS="false")
    with app.app_context():
        client = app.test_client()
        headers = {"Authorization": f"Bearer {make_token(70, 70)}"}
        body = {"email_address": "x@example.com", "imap_host": "127.0.0.1", "password": "p"}
        response = client.post("/api/v1/accounts", json=body, headers=headers)
        assert response.status_code == 422
        assert response.json["error"]["code"] == "host_not_allowed"
        odd = client.post(
            "/api/v1/accounts",
            json={**body, "imap_host": "example.com", "imap_port": 22},
            headers=headers,
        )
        assert odd.json["error"]["code"] == "host_not_allowed"


@pytest.fixture(params=["postgresql", "sqlite"])
def any_database(request):
    """The session app on PostgreSQL, or a migrated app on SQLite."""
    return request.getfixturevalue("app" if request.param == "postgresql" else "sqlite_app")


def _writer_target() -> tuple[int, int, int]:
    """(account id, folder id, run id) of a fresh account for a batch writer."""
    from webapp.models import MailFolder

    account = MailAccount(
        organization_id=1,
        user_id=1,
        email_address=f"w{time.monotonic_ns()}@example.com",
        provider="custom",
        incoming_auth_method="password",
        incoming_server="imap.example.com",
        incoming_port=993,
    )
    db.session.add(account)
    db.session.flush()
    folder = MailFolder(account_id=account.id, name="INBOX", flags=[], highest_uid=0)
    run = SyncRun(account_id=account.id, organization_id=1)
    db.session.add_all([folder, run])
    db.session.commit()
    return account.id, folder.id, run.id


def _row(account_id: int, folder_id: int, uid: int) -> tuple:
    from webapp.services.sync import COLUMNS

    values = {
        "account_id": account_id,
        "folder_id": folder_id,
        "uid": uid,
        "message_id": f"<{uid}@x>",
        "subject": f"s{uid}",
        "from_address": "a@x",
        "to_addresses": '["b@x"]',
        "cc_addresses": "[]",
        "sent_at": utcnow(),
        "flags": '["\\\\Seen"]',
        "size": 10,
        "snippet_encrypted": None,
        "modseq": None,
    }
    return tuple(values[column] for column in COLUMNS)


def test_batch_writer_skips_rows_a_killed_run_already_stored(any_database):
    """A batch that overlaps stored rows (a run killed between its commit and its ack)
    skips them (PostgreSQL: its COPY is undone, then INSERT ... ON CONFLICT DO NOTHING),
    counts only the new ones, and the folder's highest UID moves in the same
    transaction."""
    from webapp.models import MailFolder
    from webapp.services.sync import _BatchWriter

    account_id, folder_id, run_id = _writer_target()
    writer = _BatchWriter(db.engine, folder_id, run_id)
    writer.put([_row(account_id, folder_id, 1), _row(account_id, folder_id, 2)], 2)
    # uid 2 again: as after a kill between commit and ack
    writer.put([_row(account_id, folder_id, 2), _row(account_id, folder_id, 3)], 3)
    assert writer.close() == 3
    db.session.expire_all()
    stored = db.session.scalars(sa.select(MailMessage).order_by(MailMessage.uid)).all()
    assert [m.uid for m in stored] == [1, 2, 3]
    assert stored[0].to_addresses == ["b@x"] and stored[0].flags == ["\\Seen"]
    stored_folder = db.session.get(MailFolder, folder_id)
    assert (stored_folder.highest_uid, stored_folder.message_count) == (3, 3)
    assert db.session.get(SyncRun, run_id).new_count == 3


def test_a_writer_stopped_by_the_time_limit_writes_nothing_once_it_returns(app, monkeypatch):
    """The soft time limit strikes while close() waits for queued batches: the batch being
    stored is finished, the others are dropped, and the writer is done when close()
    raises, so nothing is written after the run is closed."""
    from webapp.services import sync as sync_service

    account_id, folder_id, run_id = _writer_target()
    insert = sync_service._insert

    def slow_insert(connection, rows):
        time.sleep(0.3)
        return insert(connection, rows)

    def soft_time_limit(*_args):
        raise SoftTimeLimitExceeded("soft time limit exceeded")

    monkeypatch.setattr(sync_service, "_insert", slow_insert)
    writer = sync_service._BatchWriter(db.engine, folder_id, run_id)
    for uid in range(1, 5):
        writer.put([_row(account_id, folder_id, uid)], uid)
    previous = signal.signal(signal.SIGALRM, soft_time_limit)
    signal.setitimer(signal.ITIMER_REAL, 0.1)
    try:
        with pytest.raises(SoftTimeLimitExceeded):
            writer.close()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert writer.done.is_set()
    stored = db.session.scalar(sa.select(sa.func.count()).select_from(MailMessage))
    assert stored == writer.inserted == 1
    time.sleep(0.5)
    assert db.session.scalar(sa.select(sa.func.count()).select_from(MailMessage)) == 1


def test_provider_outage_during_the_token_refresh_is_retried(
    client, auth_headers, mailbox, oauth_provider
):
    from tests.support.oauth_provider import ScriptedResponse

    db.session.execute(sa.update(UserEmailToken).values(expires_at=utcnow() - timedelta(minutes=1)))
    db.session.commit()
    oauth_provider.script("token", ScriptedResponse(status=503, body="down"))
    client.post(f"/api/v1/accounts/{mailbox['account_id']}/sync", headers=auth_headers())
    failed, healed = _wait_runs(mailbox["account_id"], 3)[-2:]
    assert failed.outcome == "failed" and "provider" in (failed.error or "").lower()
    assert healed.outcome == "succeeded"
    assert db.session.get(UserEmailToken, mailbox["token_id"]).status == "active"


# What Office 365 advertises: no CONDSTORE, no ENABLE.
OFFICE_365_CAPABILITY = (
    "IMAP4rev1 SASL-IR UIDPLUS MOVE ID UNSELECT CHILDREN IDLE NAMESPACE LITERAL+"
)


def test_server_without_condstore_gets_flag_changes_and_expunges(app, tmp_path):
    """Without CONDSTORE a folder whose UIDNEXT and message count did not move may still
    have changed flags: every sync compares them (one FLAGS fetch)."""
    from tests.support.mailserver import DovecotServer
    from webapp.services import sync as sync_service
    from webapp.services.keys import account_password_aad

    user, password = "plain@example.com", "plain-secret"
    with DovecotServer(
        "http://127.0.0.1:9/unused",
        password_users={user: password},
        workdir=tmp_path,
        imap_capability=OFFICE_365_CAPABILITY,
    ) as imap:
        imap.seed(user, "INBOX", 6)
        account = MailAccount(
            organization_id=1, user_id=1, email_address=user, provider="custom",
            incoming_auth_method="password", incoming_server=imap.host,
            incoming_port=imap.imaps_port, incoming_security="ssl", username=user,
            sync_enabled=False, status="active",
        )  # fmt: skip
        from webapp.crypto import encrypt_field

        account.password_encrypted = encrypt_field(password, "pii", account_password_aad(account))
        db.session.add(account)
        db.session.commit()
        saved = {key: app.config[key] for key in ("MAIL_ALLOWED_PORTS", "MAIL_CA_FILE")}
        app.config.update(
            MAIL_ALLOWED_PORTS=(*saved["MAIL_ALLOWED_PORTS"], imap.imaps_port),
            MAIL_CA_FILE=str(imap.ca_file),
        )
        try:
            first = sync_service.sync_account(account.id)
            assert (first.outcome, first.new_count) == ("succeeded", 6), first.error
            uids = sorted(imap.fetch_uids(user, "INBOX"))
            imap.add_flags(user, "INBOX", uids[:2], [b"\\Flagged"])
            flagged = sync_service.sync_account(account.id)
            assert (flagged.new_count, flagged.updated_count) == (0, 2)
            imap.expunge(user, "INBOX", uids[-1:])
            arrived = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
            undated = b"From: a@example.org\r\nSubject: no date\r\n\r\nhello\r\n"
            imap.append(user, "INBOX", undated, internaldate=arrived)
            last = sync_service.sync_account(account.id)
            assert (last.new_count, last.updated_count, last.deleted_count) == (1, 0, 1)
            # no Date header: the server's INTERNALDATE stands in
            sent_at = db.session.scalar(
                sa.select(MailMessage.sent_at).where(MailMessage.subject == "no date")
            )
            assert sent_at == arrived
        finally:
            app.config.update(saved)
    stored = db.session.scalars(
        sa.select(MailMessage.flags).where(MailMessage.account_id == account.id)
    ).all()
    assert len(stored) == 6 and sum("\\Flagged" in flags for flags in stored) == 2


def test_send_whose_lock_a_killed_worker_left_is_sent_once_the_lock_runs_out(
    client, auth_headers, mailbox, mail
):
    """A worker killed mid-send leaves the send lock behind, and its task is redelivered
    at once (reject_on_worker_lost): the redelivered task must come back after the lock
    runs out rather than end and leave the message queued forever."""
    from webapp.extensions import redis_store
    from webapp.services.send import SEND_LOCK_KEY

    account_id = mailbox["account_id"]
    sequence = db.session.scalar(sa.text("SELECT pg_get_serial_sequence('mail_sends', 'id')"))
    last, called = db.session.execute(
        sa.text(f"SELECT last_value, is_called FROM {sequence}")  # noqa: S608
    ).one()
    next_id = last + 1 if called else last
    redis_store.client.set(SEND_LOCK_KEY.format(next_id), "dead-worker", px=2500)
    body = {"to": ["bob@example.com"], "subject": "Held", "text": "after the lock"}
    response = client.post(f"/api/v1/accounts/{account_id}/send", json=body, headers=auth_headers())
    assert response.status_code == 202 and response.json["send_id"] == next_id
    messages = mail.smtp.wait_for_messages(1, timeout=20)
    assert b"Subject: Held" in messages[0]["data"]
    deadline = time.monotonic() + 10
    while db.session.get(OutboundMessage, next_id, populate_existing=True).status == "queued":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert db.session.get(OutboundMessage, next_id).status == "sent"
    assert len(mail.smtp.messages) == 1


def test_send_task_of_a_deleted_send_ends_instead_of_requeueing(app):
    """No row and no lock: the account (and its outbox) was deleted; nothing to wait for."""
    from tasks.sync import send_message

    assert send_message.apply(args=[987654]).get() == {"send_id": 987654, "status": "not_found"}


def _running_run(account_id: int, minutes_ago: int) -> SyncRun:
    account = db.session.get(MailAccount, account_id)
    run = SyncRun(
        account_id=account_id,
        organization_id=account.organization_id,
        started_at=utcnow() - timedelta(minutes=minutes_ago),
    )
    db.session.add(run)
    db.session.commit()
    return run


def test_sync_now_takes_over_a_run_whose_worker_was_killed(client, auth_headers, mailbox, mail):
    """A killed worker leaves its run `running`; once its lock has expired, "sync now"
    enqueues that run again and a worker finishes it, instead of answering with the
    dead run until it is 30 minutes old."""
    account_id = mailbox["account_id"]
    mail.imap.seed(mailbox["address"], "INBOX", 2)
    dead = _running_run(account_id, minutes_ago=5)
    response = client.post(f"/api/v1/accounts/{account_id}/sync", headers=auth_headers())
    assert response.status_code == 202 and response.json["sync_run_id"] == dead.id
    finished = _wait_runs(account_id, 2)[-1]
    assert (finished.id, finished.outcome, finished.new_count) == (dead.id, "succeeded", 2)


def test_sync_now_leaves_a_queued_or_live_run_alone(
    client, auth_headers, mailbox, app, monkeypatch
):
    from webapp.extensions import redis_store
    from webapp.services import accounts as accounts_service
    from webapp.services.sync import LOCK_KEY

    account_id = mailbox["account_id"]
    enqueued: list[tuple] = []
    monkeypatch.setattr(accounts_service, "enqueue", lambda *args: enqueued.append(args))
    url = f"/api/v1/accounts/{account_id}/sync"
    queued = _running_run(account_id, minutes_ago=0)  # its task waits for a worker
    assert client.post(url, headers=auth_headers()).json["sync_run_id"] == queued.id
    assert enqueued == []
    db.session.execute(
        sa.update(SyncRun)
        .where(SyncRun.id == queued.id)
        .values(started_at=utcnow() - timedelta(minutes=5))
    )
    db.session.commit()
    redis_store.client.set(LOCK_KEY.format(account_id), "live-worker", ex=60)
    assert client.post(url, headers=auth_headers()).json["sync_run_id"] == queued.id
    assert enqueued == []  # a worker holds the lock: it is syncing
    redis_store.client.delete(LOCK_KEY.format(account_id))
    assert client.post(url, headers=auth_headers()).json["sync_run_id"] == queued.id
    assert enqueued == [("tasks.sync.sync_account", account_id, queued.id)]
    db.session.execute(sa.delete(SyncRun).where(SyncRun.id == queued.id))
    db.session.commit()

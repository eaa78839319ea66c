"""Sync runs that fail, race the server or die half-way: nothing lost, nothing stored
twice, and the folder's state (highest UID, count) and the runs' counts match the rows.
Direct service calls against the session's real Dovecot."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa
from celery.exceptions import SoftTimeLimitExceeded

from tests.integration.conftest import fail_at_batch
from webapp.extensions import db, redis_store
from webapp.models import MailFolder, MailMessage, SyncRun
from webapp.services import sync as sync_service


def _inbox(account_id: int) -> MailFolder:
    db.session.expire_all()
    return db.session.scalars(
        sa.select(MailFolder).where(MailFolder.account_id == account_id, MailFolder.name == "INBOX")
    ).one()


def _uids(folder: MailFolder) -> list[int]:
    query = sa.select(MailMessage.uid).where(MailMessage.folder_id == folder.id)
    return sorted(db.session.scalars(query))


def _assert_consistent(account_id: int) -> MailFolder:
    """Folder state never claims more than the rows hold; the runs count every row."""
    inbox = _inbox(account_id)
    uids = _uids(inbox)
    assert inbox.highest_uid <= (uids[-1] if uids else 0)
    assert inbox.message_count == len(uids)
    synced = db.session.scalar(
        sa.select(sa.func.sum(SyncRun.new_count)).where(SyncRun.account_id == account_id)
    )
    assert synced == len(uids)
    return inbox


def test_writer_error_keeps_the_count_of_batches_it_stored(app, mail, imap_account, monkeypatch):
    user, account = imap_account
    mail.imap.seed(user, "INBOX", 12)
    monkeypatch.setitem(app.config, "SYNC_BATCH_SIZE", 5)
    insert = sync_service._insert
    calls: list[int] = []

    def insert_then_fail(connection, rows):
        calls.append(len(rows))
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return insert(connection, rows)

    monkeypatch.setattr(sync_service, "_insert", insert_then_fail)
    failed = sync_service.sync_account(account.id)
    assert failed.outcome == "failed" and "disk full" in (failed.error or "")
    assert len(_uids(_assert_consistent(account.id))) == 5
    monkeypatch.setattr(sync_service, "_insert", insert)
    healed = sync_service.sync_account(account.id)
    assert (healed.outcome, healed.new_count) == ("succeeded", 7), healed.error
    assert _uids(_assert_consistent(account.id)) == sorted(mail.imap.fetch_uids(user, "INBOX"))


def test_failure_mid_fetch_leaves_the_folder_count_matching_the_rows(
    app,
    mail,
    imap_account,
    monkeypatch,
):
    user, account = imap_account
    mail.imap.seed(user, "INBOX", 12)
    monkeypatch.setitem(app.config, "SYNC_BATCH_SIZE", 5)
    restore = fail_at_batch(monkeypatch, 2, lambda: mail.imap.kick(user))
    with pytest.raises(sync_service.TransientSyncError):
        sync_service.sync_account(account.id)
    assert len(_uids(_assert_consistent(account.id))) == 5
    restore()
    assert sync_service.sync_account(account.id).outcome == "succeeded"
    assert _uids(_assert_consistent(account.id)) == sorted(mail.imap.fetch_uids(user, "INBOX"))


def test_run_killed_after_a_batch_commit_is_taken_over_and_counts_every_row(
    app,
    mail,
    imap_account,
    monkeypatch,
):
    """A worker killed between the writer's commit and the run's finish leaves the run
    `running`; the next sync takes it over, stores the rest once and closes it."""
    user, account = imap_account
    mail.imap.seed(user, "INBOX", 12)
    monkeypatch.setitem(app.config, "SYNC_BATCH_SIZE", 5)

    def die() -> None:
        raise SystemExit("killed")  # not an Exception: nothing records the run

    restore = fail_at_batch(monkeypatch, 3, die)  # batch 1 is with the writer by then
    with pytest.raises(SystemExit):
        sync_service.sync_account(account.id)
    db.session.rollback()
    restore()
    healed = sync_service.sync_account(account.id)
    assert healed.outcome == "succeeded", healed.error
    runs = db.session.scalars(sa.select(SyncRun).where(SyncRun.account_id == account.id)).all()
    assert [run.outcome for run in runs] == ["succeeded"]
    assert _uids(_assert_consistent(account.id)) == sorted(mail.imap.fetch_uids(user, "INBOX"))


def test_a_batch_partly_stored_already_stores_and_counts_only_the_rest(
    app, mail, imap_account, monkeypatch
):
    """Rows above the folder's highest UID exist when a second sync ran alongside after
    the lock lapsed. The straight COPY of such a batch fails on them and is undone; the
    batch then goes through INSERT ... ON CONFLICT and only the missing rows count."""
    user, account = imap_account
    mail.imap.seed(user, "INBOX", 12)
    monkeypatch.setitem(app.config, "SYNC_BATCH_SIZE", 5)
    assert sync_service.sync_account(account.id).new_count == 12
    inbox = _inbox(account.id)
    uids = _uids(inbox)
    db.session.execute(  # the other sync stored UIDs 6-9; this one's folder says 5
        sa.delete(MailMessage).where(MailMessage.folder_id == inbox.id, MailMessage.uid > uids[8])
    )
    inbox.highest_uid, inbox.message_count = uids[4], 9
    db.session.commit()
    copy, tables = sync_service._copy, []

    def recording_copy(cursor, table, columns, rows):
        tables.append((table, len(rows)))
        return copy(cursor, table, columns, rows)

    monkeypatch.setattr(sync_service, "_copy", recording_copy)
    run = sync_service.sync_account(account.id)
    assert (run.outcome, run.new_count) == ("succeeded", 3), run.error
    assert tables == [("mail_messages", 5), ("mail_messages_staging", 5), ("mail_messages", 2)]
    inbox = _inbox(account.id)
    assert _uids(inbox) == uids and inbox.message_count == 12


def test_changes_on_the_server_during_a_sync_are_picked_up_next_time(
    app,
    mail,
    imap_account,
    monkeypatch,
):
    """While batches are fetched: flags change on a fetched message, one is expunged,
    new mail arrives. The next run has all of it, once."""
    user, account = imap_account
    mail.imap.seed(user, "INBOX", 12)
    monkeypatch.setitem(app.config, "SYNC_BATCH_SIZE", 5)
    request_new = sync_service.request_new
    batches: list[list[int]] = []

    def fetch_while_changing(client, uids):
        batches.append(uids)
        if len(batches) == 2:
            mail.imap.add_flags(user, "INBOX", batches[0][:2], [b"\\Flagged"])
            mail.imap.expunge(user, "INBOX", [batches[0][-1], uids[0]])
            mail.imap.seed(user, "INBOX", 2, subject_prefix="Late")
        return request_new(client, uids)

    monkeypatch.setattr(sync_service, "request_new", fetch_while_changing)
    first = sync_service.sync_account(account.id)
    assert first.outcome == "succeeded", first.error
    monkeypatch.setattr(sync_service, "request_new", request_new)
    second = sync_service.sync_account(account.id)
    assert second.outcome == "succeeded", second.error
    inbox = _inbox(account.id)
    on_server = sorted(mail.imap.fetch_uids(user, "INBOX"))
    assert _uids(inbox) == on_server and inbox.message_count == len(on_server)
    assert inbox.highest_uid == on_server[-1]
    rows = db.session.execute(
        sa.select(MailMessage.uid, MailMessage.flags).where(MailMessage.folder_id == inbox.id)
    )
    assert sorted(uid for uid, flags in rows if "\\Flagged" in flags) == batches[0][:2]
    third = sync_service.sync_account(account.id)
    assert (third.new_count, third.updated_count, third.deleted_count) == (0, 0, 0)


def test_the_sync_lock_is_short_lived_and_renewed_while_the_sync_runs(
    app, mail, imap_account, monkeypatch
):
    user, account = imap_account
    mail.imap.seed(user, "INBOX", 6)
    monkeypatch.setitem(app.config, "SYNC_BATCH_SIZE", 3)
    monkeypatch.setattr(sync_service, "LOCK_TTL", 1)
    client, key = redis_store.client, sync_service.LOCK_KEY.format(account.id)
    remaining: list[int] = []

    def outlast_the_ttl() -> None:
        time.sleep(1.6)
        remaining.append(client.pttl(key))

    fail_at_batch(monkeypatch, 2, outlast_the_ttl)
    run = sync_service.sync_account(account.id)
    assert (run.outcome, run.new_count) == ("succeeded", 6), run.error
    assert 0 < remaining[0] <= 1000  # renewed, never longer than its TTL
    assert client.exists(key) == 0  # released at the end


_HOLD_A_LOCK = """
import time
from webapp import create_app
with create_app().app_context():
    from webapp.extensions import redis_store
    with redis_store.locked("mailkey:test:heartbeat", timeout=1, heartbeat_for=120) as held:
        print("held" if held else "busy", flush=True)
        time.sleep(120)
"""


def test_a_killed_lock_holder_frees_the_lock_within_its_ttl(base_env, redis_url):
    """SIGKILL, as the OOM killer sends it: the renewing thread dies with the process,
    so the lock expires after its TTL (a minute for a sync), not after 30 minutes."""
    client = redis.Redis.from_url(redis_url)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_A_LOCK],
        cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, **base_env},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        time.sleep(2.5)  # more than twice the TTL: only renewals keep it
        assert client.exists("mailkey:test:heartbeat") == 1
        holder.kill()
        holder.wait(timeout=10)
        deadline = time.monotonic() + 3
        while client.exists("mailkey:test:heartbeat") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.exists("mailkey:test:heartbeat") == 0
    finally:
        holder.kill()
        client.delete("mailkey:test:heartbeat")
        client.close()


def test_the_soft_time_limit_cuts_a_stalled_fetch_short(app, mail, imap_account, monkeypatch):
    """The limit arrives while the sync waits for a FETCH's answer: the run ends at once,
    not after the read timeout, and the connection is cut there and then, so the logout
    does not read the abandoned answer (or wait out the timeout for it)."""
    user, account = imap_account
    mail.imap.seed(user, "INBOX", 4)
    monkeypatch.setitem(app.config, "SYNC_BATCH_SIZE", 2)
    monkeypatch.setitem(app.config, "MAIL_TIMEOUT_SECONDS", 20)
    cut_by: list[str] = []
    shutdown = ssl.SSLSocket.shutdown

    def recording_shutdown(sock, how):
        cut_by.append(sys._getframe(1).f_code.co_name)
        return shutdown(sock, how)

    def stalled(client, _uids, _tag):
        time.sleep(20)  # the real FETCH was sent; its answer waits unread

    def soft_time_limit(*_args):
        raise SoftTimeLimitExceeded("soft time limit exceeded")

    monkeypatch.setattr(ssl.SSLSocket, "shutdown", recording_shutdown)
    monkeypatch.setattr(sync_service, "receive_new", stalled)
    previous = signal.signal(signal.SIGALRM, soft_time_limit)
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    started = time.monotonic()
    try:
        run = sync_service.sync_account(account.id)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert time.monotonic() - started < 5  # the read timeout is 20 s
    assert run.outcome == "failed" and "SoftTimeLimitExceeded" in (run.error or "")
    assert cut_by[0] == "_fetch_new"  # before the logout's own shutdown


def test_a_failed_send_of_the_next_fetch_still_stores_the_batch_read_before_it(
    app, mail, imap_account, monkeypatch
):
    user, account = imap_account
    mail.imap.seed(user, "INBOX", 12)
    monkeypatch.setitem(app.config, "SYNC_BATCH_SIZE", 5)

    def reset() -> None:
        raise ConnectionResetError("connection reset by peer")

    restore = fail_at_batch(monkeypatch, 2, reset)
    with pytest.raises(sync_service.TransientSyncError):
        sync_service.sync_account(account.id)
    restore()
    assert _uids(_assert_consistent(account.id)) == sorted(mail.imap.fetch_uids(user, "INBOX"))[:5]
    healed = sync_service.sync_account(account.id)
    assert (healed.outcome, healed.new_count) == ("succeeded", 7), healed.error

"""What other IMAP and SMTP servers do differently: odd folder names, folders gone
between LIST and SELECT, headers PostgreSQL cannot store as they are, partly refused
recipients, temporary and permanent SMTP refusals, no XOAUTH2, a certificate for
another host. Direct service calls against the session's real Dovecot and aiosmtpd."""

from __future__ import annotations

import logging
import smtplib
import ssl

import pytest
import sqlalchemy as sa
from imapclient import IMAPClient

from tests.conftest import PASSWORD, PASSWORD_USER
from tests.integration.conftest import fail_at_batch, password_account
from tests.support.mailserver import SmtpServer, make_ca_and_cert
from webapp.extensions import db
from webapp.logs import configure_logging
from webapp.models import MailAccount, MailFolder, MailMessage, OutboundMessage
from webapp.services import mailconn
from webapp.services import send as send_service
from webapp.services import sync as sync_service
from webapp.services.imapfetch import FetchError


def _raw(subject: bytes, message_id: bytes) -> bytes:
    return (
        b"From: a@example.org\r\nTo: b@example.org\r\nSubject: " + subject
        + b"\r\nMessage-ID: <" + message_id + b">\r\n\r\nhello\r\n"
    )  # fmt: skip


def _stored(account_id: int) -> dict[str, int]:
    db.session.expire_all()
    rows = db.session.execute(
        sa.select(MailFolder.name, sa.func.count(MailMessage.id))
        .outerjoin(MailMessage, MailMessage.folder_id == MailFolder.id)
        .where(MailFolder.account_id == account_id)
        .group_by(MailFolder.name)
    )
    return dict(rows.all())


def test_odd_folder_names_and_a_folder_gone_before_select(mail, imap_account, monkeypatch):
    """Non-ASCII (modified UTF-7), spaces, quotes and an all-digit name sync; a folder
    deleted between LIST and SELECT (or one the server lists but will not open) is
    skipped for this run instead of failing the account; a rename moves the messages."""
    user, account = imap_account
    names = ["Reçus 2024", 'Say "hi"', "2024", "Old Stuff", "Archive/Über"]
    for number, name in enumerate(names):
        mail.imap.append(user, name, _raw(name.encode("ascii", "replace"), b"f%d@x" % number))
    first = sync_service.sync_account(account.id)
    assert (first.outcome, first.new_count) == ("succeeded", 5), first.error
    assert {name: 1 for name in names}.items() <= _stored(account.id).items()

    listed = IMAPClient.list_folders

    def list_then_delete(client, *args, **kwargs):
        folders = listed(client, *args, **kwargs)
        monkeypatch.setattr(IMAPClient, "list_folders", listed)
        mail.imap.delete_folder(user, "Old Stuff")
        return folders

    mail.imap.append(user, "INBOX", _raw(b"after", b"after@x"))
    monkeypatch.setattr(IMAPClient, "list_folders", list_then_delete)
    raced = sync_service.sync_account(account.id)
    assert (raced.outcome, raced.new_count) == ("succeeded", 1), raced.error
    gone = sync_service.sync_account(account.id)
    assert (gone.outcome, gone.deleted_count) == ("succeeded", 1), gone.error
    assert "Old Stuff" not in _stored(account.id)

    mail.imap.rename_folder(user, "Reçus 2024", "Reçus 2025")
    renamed = sync_service.sync_account(account.id)
    assert (renamed.new_count, renamed.deleted_count) == (1, 1), renamed.error
    stored = _stored(account.id)
    assert stored["Reçus 2025"] == 1 and "Reçus 2024" not in stored
    assert sum(stored.values()) == 5


def test_headers_postgresql_cannot_store_as_they_are_do_not_block_the_mailbox(mail, imap_account):
    """A NUL (raw, or decoded from an encoded word) is refused by PostgreSQL's text
    columns: one such spam message must not fail every sync of the account."""
    user, account = imap_account
    mail.imap.append(user, "INBOX", _raw(b"=?utf-8?b?AGJhZA==?=", b"nul@x"))
    mail.imap.append(user, "INBOX", _raw(b"caf\xe9 latin-1", b"raw\x00nul@x"))
    run = sync_service.sync_account(account.id)
    assert (run.outcome, run.new_count) == ("succeeded", 2), run.error
    subjects = db.session.scalars(
        sa.select(MailMessage.subject).where(MailMessage.account_id == account.id)
    ).all()
    assert "bad" in subjects and not any("\x00" in (s or "") for s in subjects)


def test_a_header_longer_than_the_prefix_keeps_the_body_as_its_snippet(mail, imap_account):
    """22 KB of header (the bulk fetch reads 8 KB), and a message that is all header:
    the snippet is the body (or empty), never header text."""
    from webapp.crypto import decrypt_field
    from webapp.services.keys import snippet_aad

    user, account = imap_account
    filler = b"".join(b"X-Filler-%d: %s\r\n" % (n, b"y" * 70) for n in range(300))
    mail.imap.append(
        user,
        "INBOX",
        _raw(b"big header", b"big@x").replace(b"\r\n\r\n", b"\r\n" + filler + b"\r\n"),
    )
    mail.imap.append(user, "INBOX", b"From: h@example.org\r\nSubject: all header\r\n")
    run = sync_service.sync_account(account.id)
    assert (run.outcome, run.new_count) == ("succeeded", 2), run.error
    rows = db.session.scalars(sa.select(MailMessage).where(MailMessage.account_id == account.id))
    snippets = {
        row.subject: row.snippet_encrypted
        and decrypt_field(row.snippet_encrypted, "pii", snippet_aad(row.folder_id, row.uid))
        for row in rows
    }
    assert snippets == {"big header": "hello", "all header": None}


@pytest.fixture
def smtp_account(app, mail, monkeypatch):
    monkeypatch.setattr(send_service, "enqueue", lambda *args, **kwargs: "not-queued")
    return password_account(mail, PASSWORD_USER, PASSWORD)


def _send(account: MailAccount, to: list[str]) -> OutboundMessage:
    return send_service.queue_send(account, {"to": to, "subject": "Hi", "text": "Hello"}, None)


def test_partly_refused_recipients_are_recorded_on_the_sent_message(mail, smtp_account):
    mail.smtp.rcpt_replies["nobody@example.net"] = "550 5.1.1 <nobody@example.net>: no such user"
    send = send_service.deliver(_send(smtp_account, ["bob@example.com", "nobody@example.net"]).id)
    assert send is not None and send.status == "sent"
    assert send.error and "nobody@example.net" in send.error and "5.1.1" in send.error
    assert [m["rcpt_tos"] for m in mail.smtp.messages] == [["bob@example.com"]]


def test_temporary_smtp_refusals_retry_and_send_once_permanent_ones_fail(mail, smtp_account):
    mail.smtp.rcpt_replies["bob@example.com"] = "450 4.2.0 <bob@example.com>: greylisted"
    greylisted = _send(smtp_account, ["bob@example.com"])
    with pytest.raises(send_service.TransientSendError):
        send_service.deliver(greylisted.id)
    mail.smtp.rcpt_replies.clear()
    mail.smtp.data_replies.append("451 4.3.0 try again later")
    with pytest.raises(send_service.TransientSendError):
        send_service.deliver(greylisted.id)
    assert send_service.deliver(greylisted.id).status == "sent"
    assert send_service.deliver(greylisted.id).status == "sent"  # a late retry: not again
    assert len(mail.smtp.messages) == 1

    mail.smtp.data_replies.append("554 5.7.1 message rejected as spam")
    refused = send_service.deliver(_send(smtp_account, ["bob@example.com"]).id)
    assert refused.status == "failed"
    assert "554 5.7.1 message rejected as spam" in refused.error
    mail.smtp.rcpt_replies["bob@example.com"] = "550 5.1.1 <bob@example.com>: no such user"
    unknown = send_service.deliver(_send(smtp_account, ["bob@example.com"]).id)
    assert unknown.status == "failed" and "550 5.1.1" in unknown.error
    assert len(mail.smtp.messages) == 1


def test_oauth_account_on_a_server_without_xoauth2_fails_clearly_without_a_refresh(
    app, mail, monkeypatch
):
    refreshes: list[bool] = []

    def token(token_id: int, force_refresh: bool = False) -> str:
        refreshes.append(force_refresh)
        return "access-token"

    monkeypatch.setattr(mailconn, "get_valid_access_token", token)
    with SmtpServer(
        "http://127.0.0.1:9/unused",
        password_users={"x@example.com": "x"},
        tls_cert=mail.imap.cert_file,
        tls_key=mail.imap.key_file,
        ca_file=mail.imap.ca_file,
        exclude_auth=("XOAUTH2",),
    ) as plain_only:
        account = MailAccount(
            email_address="x@example.com", incoming_auth_method="oauth2", token_id=1,
            outgoing_server=plain_only.host, outgoing_port=plain_only.port,
            outgoing_security="starttls",
        )  # fmt: skip
        with pytest.raises(mailconn.MailAuthFailed) as failure:
            with mailconn.smtp_session(account):
                pass
    assert "XOAUTH2" in failure.value.server_message
    assert "PLAIN" in failure.value.server_message
    assert refreshes == [False]  # no forced refresh: a new token would not help


def test_smtp_certificate_for_another_host_fails_and_is_not_retried(app, tmp_path, monkeypatch):
    """A certificate from a trusted CA, but for another name than the one dialled."""
    ca, cert, key = make_ca_and_cert(tmp_path / "other", hostnames=("mail.other.test",), ips=())
    monkeypatch.setitem(app.config, "MAIL_CA_FILE", str(ca))
    for security in ("starttls", "ssl"):  # 587 and 465
        with SmtpServer(
            "http://127.0.0.1:9/unused", tls_cert=cert, tls_key=key, ca_file=ca, security=security
        ) as other:
            with pytest.raises(ssl.SSLCertVerificationError) as failure:
                mailconn._smtp_open(other.host, other.port, security)
        assert "mismatch" in str(failure.value) and not mailconn.is_transient(failure.value)


def test_smtp_errors_that_a_retry_cannot_fix_are_permanent():
    assert not mailconn.is_transient(smtplib.SMTPNotSupportedError("STARTTLS not supported"))
    assert not mailconn.is_transient(smtplib.SMTPException("No suitable authentication method"))
    assert mailconn.is_transient(smtplib.SMTPServerDisconnected("gone"))
    assert mailconn.is_transient(FetchError("FETCH failed: NO"))  # Gmail: try again later
    assert mailconn.is_transient(smtplib.SMTPDataError(451, b"4.3.0 later"))


def test_bye_mid_fetch_over_starttls_is_retryable_and_loses_nothing(
    app, mail, imap_account, monkeypatch
):
    """IMAP on 143 with STARTTLS; the server says BYE after the first batch: the run fails
    as retryable, keeps what it stored, and the next run stores the rest exactly once."""
    user, account = imap_account
    account.incoming_port, account.incoming_security = mail.imap.imap_port, "starttls"
    db.session.commit()
    mail.imap.seed(user, "INBOX", 12)
    monkeypatch.setitem(app.config, "SYNC_BATCH_SIZE", 5)
    restore = fail_at_batch(monkeypatch, 2, lambda: mail.imap.kick(user))
    with pytest.raises(sync_service.TransientSyncError):
        sync_service.sync_account(account.id)
    restore()
    db.session.expire_all()
    failed = db.session.scalars(sa.select(sync_service.SyncRun)).one()
    inbox = db.session.scalars(sa.select(MailFolder).where(MailFolder.name == "INBOX")).one()
    assert failed.outcome == "failed" and failed.new_count == _stored(account.id)["INBOX"] == 5
    assert inbox.highest_uid == sorted(mail.imap.fetch_uids(user, "INBOX"))[4]  # batch 1's last
    healed = sync_service.sync_account(account.id)
    assert (healed.outcome, healed.new_count) == ("succeeded", 7), healed.error
    uids = db.session.scalars(sa.select(MailMessage.uid).where(MailMessage.folder_id == inbox.id))
    assert sorted(uids) == sorted(mail.imap.fetch_uids(user, "INBOX"))
    assert db.session.get(MailAccount, account.id).status == "active"


def test_a_display_name_cannot_add_addresses_to_the_from_header():
    account = MailAccount(email_address="me@example.com", display_name="Boss <ceo@bank.example>, x")
    send = OutboundMessage(message_id="<id@example.com>")
    message = send_service.build_message(account, send, {"to": ["bob@example.com"]})
    assert [a.addr_spec for a in message["From"].addresses] == ["me@example.com"]


def test_imaplib_debug_output_is_off_unless_its_logger_listens(mail, imap_account):
    """IMAPClient turns imaplib's debug level to 5, which formats every line and literal
    read (whole messages, in a bulk fetch) for a logger that usually drops it."""
    _user, account = imap_account
    with mailconn.imap_session(account) as client:
        assert client._imap.debug == 0
    root, quiet = logging.getLogger(), logging.getLogger("imapclient")
    saved = root.level, list(root.handlers), quiet.level
    configure_logging("DEBUG")  # LOG_LEVEL=DEBUG: the wire log (mail contents) stays off
    try:
        with mailconn.imap_session(account) as client:
            assert client._imap.debug == 0
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
        quiet.setLevel(saved[2])
    imaplib_logger = logging.getLogger("imapclient.imaplib")
    level = imaplib_logger.level
    imaplib_logger.setLevel(logging.DEBUG)
    try:
        with mailconn.imap_session(account) as client:
            assert client._imap.debug == 5
    finally:
        imaplib_logger.setLevel(level)

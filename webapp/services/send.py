"""Sending mail through the outbox: queued once (Idempotency-Key), sent once.

The request is stored encrypted (PII key) until it is sent, then wiped. The task
takes a per-send lock and never sends a row that is already `sent`; the stable
Message-ID lets receivers drop a duplicate in the one window that cannot be
closed (a worker killed after the server accepted the message, before the
commit).
"""

from __future__ import annotations

import json
import logging
import smtplib
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from webapp.crypto import DecryptionError, decrypt_field, encrypt_field
from webapp.errors import NeedsReauth, TokenRevoked
from webapp.extensions import db, redis_store
from webapp.metrics import SENDS_TOTAL
from webapp.models import MailAccount, OutboundMessage, utcnow
from webapp.services.keys import payload_aad
from webapp.services.mailconn import MailAuthFailed, is_transient, smtp_session
from webapp.services.queue import enqueue

log = logging.getLogger("mailkey.send")


SEND_LOCK_KEY = "mailkey:lock:send:{}"


class TransientSendError(Exception):
    """The SMTP server or the network failed before the message was accepted."""


def queue_send(
    account: MailAccount, request: dict[str, Any], idempotency_key: str | None
) -> OutboundMessage:
    """Store the send (or find the one this Idempotency-Key already stored) and enqueue it."""
    if idempotency_key:
        existing = _by_key(account.id, idempotency_key)
        if existing is not None:
            return existing
    domain = account.email_address.rpartition("@")[2] or "mailkey.local"
    send = OutboundMessage(
        account_id=account.id,
        organization_id=account.organization_id,
        idempotency_key=idempotency_key,
        message_id=make_msgid(domain=domain),
        recipient_count=sum(len(request.get(k) or []) for k in ("to", "cc", "bcc")),
        status="queued",
    )
    db.session.add(send)
    try:
        db.session.flush()
    except IntegrityError:
        db.session.rollback()  # the same key, stored by a concurrent request
        existing = _by_key(account.id, idempotency_key or "")
        if existing is None:
            raise
        return existing
    send.payload_encrypted = encrypt_field(json.dumps(request), "pii", payload_aad(send.id))
    db.session.commit()
    enqueue("tasks.sync.send_message", send.id)
    return send


def _by_key(account_id: int, key: str) -> OutboundMessage | None:
    return db.session.scalars(
        select(OutboundMessage).where(
            OutboundMessage.account_id == account_id, OutboundMessage.idempotency_key == key
        )
    ).first()


def build_message(
    account: MailAccount, send: OutboundMessage, request: dict[str, Any]
) -> EmailMessage:
    message = EmailMessage()
    sender = account.email_address
    # Address quotes the display name: a name holding "<x@y>, " cannot add a sender.
    message["From"] = Address(display_name=account.display_name or "", addr_spec=sender)
    if request.get("to"):
        message["To"] = ", ".join(request["to"])
    if request.get("cc"):
        message["Cc"] = ", ".join(request["cc"])
    message["Subject"] = request.get("subject") or ""
    message["Date"] = formatdate(localtime=False)
    message["Message-ID"] = send.message_id
    if request.get("in_reply_to"):
        message["In-Reply-To"] = request["in_reply_to"]
    if request.get("references"):
        message["References"] = " ".join(request["references"])
    message.set_content(request.get("text") or "")
    if request.get("html"):
        message.add_alternative(request["html"], subtype="html")
    return message


def deliver(send_id: int) -> OutboundMessage | None:
    """Send one queued message. Raises TransientSendError for a retry."""
    with redis_store.locked(SEND_LOCK_KEY.format(send_id), timeout=600, wait=5) as acquired:
        if not acquired:
            return None
        send = db.session.get(OutboundMessage, send_id, populate_existing=True)
        if send is None or send.status != "queued" or send.payload_encrypted is None:
            return send  # already sent or failed: never send twice
        account = db.session.get(MailAccount, send.account_id)
        if account is None:
            return _fail(send, "the account was deleted")
        try:
            payload = decrypt_field(send.payload_encrypted, "pii", payload_aad(send.id))
        except DecryptionError:  # tampered, or its key dropped: it can never be sent
            return _fail(send, "the queued message cannot be decrypted")
        request = json.loads(payload)
        send.attempts += 1
        db.session.commit()
        recipients = [*request.get("to", []), *request.get("cc", []), *request.get("bcc", [])]
        try:
            with smtp_session(account) as smtp:
                refused = smtp.send_message(
                    build_message(account, send, request),
                    from_addr=account.email_address,
                    to_addrs=recipients,
                )
        except (NeedsReauth, TokenRevoked) as exc:
            return _fail(send, exc.message)
        except MailAuthFailed as exc:
            return _fail(send, f"authentication failed: {exc.server_message}")
        except smtplib.SMTPRecipientsRefused as exc:
            error = f"recipients refused: {_refusals(exc.recipients)}"
            if any(400 <= code < 500 for code, _reply in exc.recipients.values()):
                db.session.rollback()  # greylisting, a full mailbox; nothing was sent yet
                raise TransientSendError(error) from exc
            return _fail(send, error)
        except smtplib.SMTPResponseException as exc:
            error = f"the SMTP server answered {exc.smtp_code} {_text(exc.smtp_error)}"
            if is_transient(exc):
                db.session.rollback()
                raise TransientSendError(error) from exc
            return _fail(send, error)
        except Exception as exc:
            if is_transient(exc):
                db.session.rollback()
                raise TransientSendError(f"{type(exc).__name__}: {exc}") from exc
            return _fail(send, f"{type(exc).__name__}: {exc}")
        send.status = "sent"
        send.sent_at = utcnow()
        # Sent to the others; retrying the refused ones would send it twice to those.
        send.error = f"recipients refused: {_refusals(refused)}"[:2000] if refused else None
        send.payload_encrypted = None
        db.session.commit()
        SENDS_TOTAL.labels("sent").inc()
        log.info("mail_sent", extra={"event": "mail_sent", "send_id": send.id})
        return send


def _refusals(recipients: dict[str, tuple[int, bytes]]) -> str:
    return "; ".join(
        f"{address} ({code} {_text(text)})" for address, (code, text) in recipients.items()
    )


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _fail(send: OutboundMessage, error: str) -> OutboundMessage:
    send.status = "failed"
    send.error = error[:2000]
    send.payload_encrypted = None
    db.session.commit()
    SENDS_TOTAL.labels("failed").inc()
    log.warning("mail_send_failed", extra={"event": "mail_send_failed", "send_id": send.id})
    return send


def give_up(send_id: int, error: str) -> None:
    """After the last retry: the send is failed, with the last error."""
    send = db.session.get(OutboundMessage, send_id)
    if send is not None and send.status == "queued":
        _fail(send, error)

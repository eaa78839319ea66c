"""Mail accounts, their folders, messages, sync runs and sends, owner-checked."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from webapp.crypto import DecryptionError, decrypt_field, encrypt_field
from webapp.errors import MailServerRejected, NotFound, ValidationFailed
from webapp.extensions import db
from webapp.models import (
    MailAccount,
    MailFolder,
    MailMessage,
    OutboundMessage,
    SyncRun,
    UserEmailToken,
)
from webapp.services.keys import account_password_aad, snippet_aad
from webapp.services.mailconn import MailAuthFailed, check_user_host, try_imap_login
from webapp.services.pagination import decode_cursor, encode_cursor, paginate
from webapp.services.queue import enqueue
from webapp.services.send import queue_send
from webapp.services.sync import orphaned, start_run
from webapp.services.tokens import ensure_usable

Owner = tuple[int, int]


def _invalid(field: str, message: str) -> ValidationFailed:
    """422 `validation_error`: DESIGN.md's error codes have no generic "conflict"."""
    return ValidationFailed(message, fields={field: [message]})


def _ensure_token_usable(account: MailAccount) -> None:
    """409 `token_revoked` / `needs_reauth` now, rather than a sync or send that must fail."""
    if account.uses_oauth and account.token_id is not None:
        token = db.session.get(UserEmailToken, account.token_id)
        if token is not None:
            ensure_usable(token)


def get_owned_account(owner: Owner, account_id: int) -> MailAccount:
    account = db.session.get(MailAccount, account_id)
    if account is None or (account.organization_id, account.user_id) != owner:
        raise NotFound("no such account")
    return account


def list_accounts(owner: Owner, limit: int, cursor: str | None) -> dict[str, Any]:
    query = select(MailAccount).where(
        MailAccount.organization_id == owner[0], MailAccount.user_id == owner[1]
    )
    return paginate(query, MailAccount.id, limit, cursor)


def _try_login(
    host: str, port: int, security: str, username: str, password: str, address: str | None
) -> None:
    try:
        try_imap_login(host, port, security, username, password, address=address)
    except MailAuthFailed as exc:
        raise MailServerRejected(
            f"the IMAP server refused the login: {exc.server_message}"
        ) from None
    except OSError as exc:
        raise MailServerRejected(
            f"could not reach the IMAP server: {type(exc).__name__}: {exc}",
            reason="unreachable",
        ) from None


def create_password_account(owner: Owner, data: dict[str, Any]) -> MailAccount:
    """Check the hosts, try the login, then save (the password only as ciphertext)."""
    imap_address = check_user_host(data["imap_host"], data["imap_port"], "imap_host")
    if data.get("smtp_host"):
        check_user_host(data["smtp_host"], data["smtp_port"], "smtp_host")
    address = data["email_address"].strip().lower()
    username = data.get("username") or address
    _try_login(
        data["imap_host"],
        data["imap_port"],
        data["imap_security"],
        username,
        data["password"],
        imap_address,
    )
    account = MailAccount(
        organization_id=owner[0],
        user_id=owner[1],
        email_address=address,
        display_name=data.get("display_name"),
        provider="custom",
        incoming_auth_method="password",
        incoming_server=data["imap_host"],
        incoming_port=data["imap_port"],
        incoming_security=data["imap_security"],
        outgoing_server=data.get("smtp_host"),
        outgoing_port=data.get("smtp_port"),
        outgoing_security=data.get("smtp_security"),
        username=username,
        sync_enabled=data.get("sync_enabled", True),
        status="active",
    )
    account.password_encrypted = encrypt_field(
        data["password"], "pii", account_password_aad(account)
    )
    db.session.add(account)
    try:
        db.session.commit()
    except IntegrityError:
        db.session.rollback()
        raise _invalid("email_address", "an account for this address already exists") from None
    if account.sync_enabled:  # disabled: synced only when asked (POST .../sync)
        enqueue("tasks.sync.sync_account", account.id)
    return account


def update_account(owner: Owner, account_id: int, changes: dict[str, Any]) -> MailAccount:
    account = get_owned_account(owner, account_id)
    if "password" in changes:
        if account.uses_oauth:
            raise _invalid(
                "password", "OAuth accounts have no password; reconnect the mailbox instead"
            )
        _try_login(
            account.incoming_server,
            account.incoming_port,
            account.incoming_security,
            account.username or account.email_address,
            changes["password"],
            check_user_host(account.incoming_server, account.incoming_port, "imap_host"),
        )
        account.password_encrypted = encrypt_field(
            changes["password"], "pii", account_password_aad(account)
        )
        if account.status == "error":
            account.status, account.last_error = "active", None
    if "display_name" in changes:
        account.display_name = changes["display_name"]
    if "sync_enabled" in changes:
        account.sync_enabled = changes["sync_enabled"]
    db.session.commit()
    return account


def delete_account(owner: Owner, account_id: int) -> None:
    db.session.delete(get_owned_account(owner, account_id))
    db.session.commit()


def list_folders(owner: Owner, account_id: int, limit: int, cursor: str | None) -> dict[str, Any]:
    """In the order the sync first saw them (the server's LIST order)."""
    account = get_owned_account(owner, account_id)
    query = select(MailFolder).where(MailFolder.account_id == account.id)
    return paginate(query, MailFolder.id, limit, cursor)


def list_messages(
    owner: Owner,
    account_id: int,
    *,
    folder: str | None,
    since: datetime | None,
    limit: int,
    cursor: str | None,
) -> dict[str, Any]:
    account = get_owned_account(owner, account_id)
    query = (
        select(MailMessage, MailFolder.name)
        .join(MailFolder, MailFolder.id == MailMessage.folder_id)
        .where(MailMessage.account_id == account.id)
    )
    if folder:
        query = query.where(MailFolder.name == folder)
    if since:
        query = query.where(MailMessage.sent_at >= since)
    if cursor:
        query = query.where(MailMessage.id < decode_cursor(cursor))
    # Newest stored first, as a mailbox viewer expects.
    rows = db.session.execute(query.order_by(MailMessage.id.desc()).limit(limit + 1)).all()
    next_cursor = encode_cursor(rows[limit - 1][0].id) if len(rows) > limit else None
    return {
        "items": [_message_view(m, name) for m, name in rows[:limit]],
        "next_cursor": next_cursor,
    }


def _message_view(message: MailMessage, folder_name: str) -> dict[str, Any]:
    snippet = None
    if message.snippet_encrypted:
        try:
            snippet = decrypt_field(
                message.snippet_encrypted, "pii", snippet_aad(message.folder_id, message.uid)
            )
        except DecryptionError:
            snippet = None
    return {
        "id": message.id,
        "folder": folder_name,
        "uid": message.uid,
        "message_id": message.message_id,
        "subject": message.subject,
        "from_address": message.from_address,
        "to_addresses": message.to_addresses,
        "cc_addresses": message.cc_addresses,
        "sent_at": message.sent_at,
        "flags": message.flags,
        "size": message.size,
        "snippet": snippet,
    }


def request_sync(owner: Owner, account_id: int) -> int:
    """The running run's id, or a new run enqueued for the workers. A running run whose
    worker was killed is enqueued again, to be taken over and finished."""
    account = get_owned_account(owner, account_id)
    _ensure_token_usable(account)
    run, already_running = start_run(account)
    if not already_running or orphaned(run):
        enqueue("tasks.sync.sync_account", account.id, run.id)
    return run.id


def list_sync_runs(owner: Owner, account_id: int, limit: int, cursor: str | None) -> dict[str, Any]:
    account = get_owned_account(owner, account_id)
    query = select(SyncRun).where(SyncRun.account_id == account.id)
    return paginate(query, SyncRun.id, limit, cursor, newest_first=True)


def send(
    owner: Owner, account_id: int, request: dict[str, Any], key: str | None
) -> OutboundMessage:
    account = get_owned_account(owner, account_id)
    _ensure_token_usable(account)
    if not account.outgoing_server:
        raise _invalid("smtp_host", "the account has no SMTP server configured")
    return queue_send(account, json.loads(json.dumps(request, default=str)), key)


def get_send(owner: Owner, account_id: int, send_id: int) -> OutboundMessage:
    account = get_owned_account(owner, account_id)
    send_row = db.session.get(OutboundMessage, send_id)
    if send_row is None or send_row.account_id != account.id:
        raise NotFound("no such send")
    return send_row

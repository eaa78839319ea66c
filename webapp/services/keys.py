"""Key rotation: re-encrypt every ciphertext that is not under the current key.

Safe while web, workers and beat run, and safe to kill at any point: each batch
is its own transaction holding row locks (FOR UPDATE on PostgreSQL), a row is
only ever rewritten with a ciphertext already checked to decrypt, and the next
run picks up exactly the rows still under an old key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import InstrumentedAttribute

from webapp.crypto import (
    DecryptionError,
    EncryptionKeys,
    aad_for,
    get_keyring,
    reencrypt,
)
from webapp.extensions import db
from webapp.models import MailAccount, MailMessage, UserEmailToken


def token_aad(row: Any, column: str) -> str:
    return aad_for(row.organization_id, row.user_id, row.provider, row.email_address, column)


def account_password_aad(row: Any) -> str:
    return aad_for(
        row.organization_id, row.user_id, row.provider, row.email_address, "password_encrypted"
    )


def snippet_aad(folder_id: int, uid: int) -> str:
    return f"mailkey:v1|table=mail_messages|folder={folder_id}|uid={uid}|column=snippet"


@dataclass(frozen=True)
class EncryptedColumn:
    """One ciphertext column: its model, key and how its AAD is built from a row."""

    name: str
    model: Any
    column: InstrumentedAttribute[Any]
    key_id: EncryptionKeys
    aad_columns: tuple[InstrumentedAttribute[Any], ...]
    aad: Callable[[Any], str]


COLUMNS: tuple[EncryptedColumn, ...] = (
    EncryptedColumn(
        "user_email_tokens.access_token_encrypted",
        UserEmailToken,
        UserEmailToken.access_token_encrypted,
        EncryptionKeys.OAUTH,
        (
            UserEmailToken.organization_id,
            UserEmailToken.user_id,
            UserEmailToken.provider,
            UserEmailToken.email_address,
        ),
        lambda row: token_aad(row, "access_token_encrypted"),
    ),
    EncryptedColumn(
        "user_email_tokens.refresh_token_encrypted",
        UserEmailToken,
        UserEmailToken.refresh_token_encrypted,
        EncryptionKeys.OAUTH_REFRESH,
        (
            UserEmailToken.organization_id,
            UserEmailToken.user_id,
            UserEmailToken.provider,
            UserEmailToken.email_address,
        ),
        lambda row: token_aad(row, "refresh_token_encrypted"),
    ),
    EncryptedColumn(
        "mail_accounts.password_encrypted",
        MailAccount,
        MailAccount.password_encrypted,
        EncryptionKeys.PII,
        (
            MailAccount.organization_id,
            MailAccount.user_id,
            MailAccount.provider,
            MailAccount.email_address,
        ),
        account_password_aad,
    ),
    EncryptedColumn(
        "mail_messages.snippet_encrypted",
        MailMessage,
        MailMessage.snippet_encrypted,
        EncryptionKeys.PII,
        (MailMessage.folder_id, MailMessage.uid),
        lambda row: snippet_aad(row.folder_id, row.uid),
    ),
)


def _stale(spec: EncryptedColumn) -> Any:
    """Rows whose ciphertext is not under the current key of its column."""
    current = get_keyring().current_fingerprint(spec.key_id)
    return spec.column.is_not(None) & ~spec.column.startswith(f"v1:{current}:")


def count_stale(spec: EncryptedColumn) -> int:
    return db.session.scalar(select(func.count()).select_from(spec.model).where(_stale(spec))) or 0


def count_encrypted(spec: EncryptedColumn) -> int:
    query = select(func.count()).select_from(spec.model).where(spec.column.is_not(None))
    return db.session.scalar(query) or 0


@dataclass
class RotationReport:
    rotated: int = 0
    current: int = 0
    failed: dict[str, list[int]] = field(default_factory=dict)

    @property
    def failed_count(self) -> int:
        return sum(len(ids) for ids in self.failed.values())


def rotate_column(
    spec: EncryptedColumn, report: RotationReport, batch_size: int, dry_run: bool
) -> Iterator[int]:
    """Re-encrypt one column in batches; yields the number of rows handled per batch."""
    if dry_run:
        yield count_stale(spec)
        return
    pk = spec.model.id
    last_id = 0
    dialect = db.engine.dialect.name
    while True:
        query = (
            select(pk, spec.column, *spec.aad_columns)
            .where(_stale(spec), pk > last_id)
            .order_by(pk)
            .limit(batch_size)
        )
        if dialect == "postgresql":
            query = query.with_for_update(of=spec.model)
        rows = db.session.execute(query).all()
        if not rows:
            db.session.rollback()
            return
        changes = []
        for row in rows:
            try:
                fresh = reencrypt(row[1], spec.key_id, spec.aad(row))
            except DecryptionError:
                report.failed.setdefault(spec.name, []).append(row.id)
                continue
            changes.append({"id": row.id, spec.column.key: fresh})
        if changes:
            db.session.execute(update(spec.model), changes)
        db.session.commit()
        report.rotated += len(changes)
        last_id = rows[-1].id
        yield len(rows)


def fingerprint_counts() -> list[tuple[str, str, str, int]]:
    """(column, fingerprint, role, rows) for every ciphertext column."""
    keyring = get_keyring()
    result = []
    for spec in COLUMNS:
        fp = func.substr(spec.column, 4, 8)
        rows = db.session.execute(
            select(fp, func.count()).where(spec.column.is_not(None)).group_by(fp).order_by(fp)
        ).all()
        known = keyring.fingerprints(spec.key_id)
        for fingerprint, count in rows:
            if fingerprint == known[0]:
                role = "current"
            elif fingerprint in known:
                role = "previous"
            else:
                role = "unknown"
            result.append((spec.name, fingerprint, role, count))
    return result

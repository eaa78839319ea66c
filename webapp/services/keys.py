"""Key rotation: re-encrypt every ciphertext that is not under the current key.

Safe while web, workers and beat run, and safe to kill at any point: each batch
is its own transaction holding row locks (FOR UPDATE on PostgreSQL), a row is
only ever rewritten with a ciphertext already checked to decrypt, and the next
run picks up exactly the rows still under an old key. All ciphertext columns of
a table are rewritten in one pass, by one UPDATE ... FROM (VALUES ...) a batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, or_, select, update
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
    """One ciphertext column: its key and how its AAD is built from a row."""

    name: str
    column: InstrumentedAttribute[Any]
    key_id: EncryptionKeys
    aad: Callable[[Any], str]


@dataclass(frozen=True)
class EncryptedTable:
    """A table's ciphertext columns and the columns their AADs are made of."""

    model: Any
    columns: tuple[EncryptedColumn, ...]
    aad_columns: tuple[InstrumentedAttribute[Any], ...]


_TOKEN_OWNER = (
    UserEmailToken.organization_id,
    UserEmailToken.user_id,
    UserEmailToken.provider,
    UserEmailToken.email_address,
)
TABLES: tuple[EncryptedTable, ...] = (
    EncryptedTable(
        UserEmailToken,
        (
            EncryptedColumn(
                "user_email_tokens.access_token_encrypted",
                UserEmailToken.access_token_encrypted,
                EncryptionKeys.OAUTH,
                lambda row: token_aad(row, "access_token_encrypted"),
            ),
            EncryptedColumn(
                "user_email_tokens.refresh_token_encrypted",
                UserEmailToken.refresh_token_encrypted,
                EncryptionKeys.OAUTH_REFRESH,
                lambda row: token_aad(row, "refresh_token_encrypted"),
            ),
        ),
        _TOKEN_OWNER,
    ),
    EncryptedTable(
        MailAccount,
        (
            EncryptedColumn(
                "mail_accounts.password_encrypted",
                MailAccount.password_encrypted,
                EncryptionKeys.PII,
                account_password_aad,
            ),
        ),
        (
            MailAccount.organization_id,
            MailAccount.user_id,
            MailAccount.provider,
            MailAccount.email_address,
        ),
    ),
    EncryptedTable(
        MailMessage,
        (
            EncryptedColumn(
                "mail_messages.snippet_encrypted",
                MailMessage.snippet_encrypted,
                EncryptionKeys.PII,
                lambda row: snippet_aad(row.folder_id, row.uid),
            ),
        ),
        (MailMessage.folder_id, MailMessage.uid),
    ),
)
COLUMNS: tuple[EncryptedColumn, ...] = tuple(c for table in TABLES for c in table.columns)


def _stale(spec: EncryptedColumn) -> Any:
    """Rows whose ciphertext is not under the current key of its column."""
    current = get_keyring().current_fingerprint(spec.key_id)
    return spec.column.is_not(None) & ~spec.column.startswith(f"v1:{current}:")


def _count(model: Any, condition: Any) -> int:
    return db.session.scalar(select(func.count()).select_from(model).where(condition)) or 0


def count_stale(spec: EncryptedColumn) -> int:
    return _count(spec.column.class_, _stale(spec))


def count_encrypted(spec: EncryptedColumn) -> int:
    return _count(spec.column.class_, spec.column.is_not(None))


def count_stale_rows(table: EncryptedTable) -> int:
    return _count(table.model, or_(*(_stale(spec) for spec in table.columns)))


@dataclass
class RotationReport:
    rotated: int = 0
    failed: dict[str, list[int]] = field(default_factory=dict)

    @property
    def failed_count(self) -> int:
        return sum(len(ids) for ids in self.failed.values())


def rotate_table(table: EncryptedTable, report: RotationReport, batch_size: int) -> Iterator[int]:
    """Re-encrypt a table's stale ciphertexts in batches; yields rows handled per batch."""
    pk = table.model.id
    keyring = get_keyring()
    current = {
        spec.name: f"v1:{keyring.current_fingerprint(spec.key_id)}:" for spec in table.columns
    }
    stale = or_(*(_stale(spec) for spec in table.columns))
    postgres = db.engine.dialect.name == "postgresql"
    last_id = 0
    while True:
        query = (
            select(pk, *(spec.column for spec in table.columns), *table.aad_columns)
            .where(stale, pk > last_id)
            .order_by(pk)
            .limit(batch_size)
        )
        if postgres:
            query = query.with_for_update(of=table.model)
        rows = db.session.execute(query).all()
        if not rows:
            db.session.rollback()
            return
        changes: list[tuple[Any, ...]] = []
        for row in rows:
            values, changed = [], False
            for index, spec in enumerate(table.columns, start=1):
                value = row[index]
                if value is not None and not value.startswith(current[spec.name]):
                    try:
                        value = reencrypt(value, spec.key_id, spec.aad(row))
                        changed = True
                        report.rotated += 1
                    except DecryptionError:
                        report.failed.setdefault(spec.name, []).append(row.id)
                values.append(value)
            if changed:
                changes.append((row.id, *values))
        if changes:
            _write(table, changes, postgres)
        db.session.commit()
        last_id = rows[-1].id
        yield len(rows)


def _write(table: EncryptedTable, changes: list[tuple[Any, ...]], postgres: bool) -> None:
    names = [spec.column.key for spec in table.columns]
    if not postgres:  # SQLite (development): the ORM's bulk UPDATE by primary key
        db.session.execute(
            update(table.model), [dict(zip(["id", *names], c, strict=True)) for c in changes]
        )
        return
    row_sql = "(%s::bigint" + ", %s::text" * len(names) + ")"
    assignments = ", ".join(f"{name} = v.{name}" for name in names)
    sql = (
        f"UPDATE {table.model.__tablename__} AS t SET {assignments} "  # noqa: S608 - names are ours
        f"FROM (VALUES {', '.join([row_sql] * len(changes))}) AS v(id, {', '.join(names)}) "
        "WHERE t.id = v.id"
    )
    db.session.connection().exec_driver_sql(sql, tuple(v for change in changes for v in change))


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

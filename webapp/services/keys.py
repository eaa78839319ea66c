"""Key rotation: re-encrypt every ciphertext that is not under the current key.

Safe while web, workers and beat run, and safe to kill at any point: each batch
is its own transaction holding row locks (FOR UPDATE SKIP LOCKED on PostgreSQL:
rotation never waits on a row the service is writing, so it can never be part
of a deadlock), a row is only ever rewritten with a ciphertext already checked
to decrypt, and the next run picks up exactly the rows still under an old key.
All ciphertext columns of a table are rewritten in one pass, one UPDATE a batch.
Rows skipped because they were locked, or written under an old key meanwhile (a
process still running with the old keys), are taken by sweep passes at the end;
what still remains is reported, never silently left behind.
"""

from __future__ import annotations

import os
import sys
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
from webapp.models import MailAccount, MailMessage, OutboundMessage, UserEmailToken


def token_aad(row: Any, column: str) -> str:
    return aad_for(row.organization_id, row.user_id, row.provider, row.email_address, column)


def account_password_aad(row: Any) -> str:
    return aad_for(
        row.organization_id, row.user_id, row.provider, row.email_address, "password_encrypted"
    )


def snippet_aad(folder_id: int, uid: int) -> str:
    return f"mailkey:v1|table=mail_messages|folder={folder_id}|uid={uid}|column=snippet"


def payload_aad(send_id: int) -> str:
    return f"mailkey:v1|table=mail_sends|id={send_id}|column=payload"


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
    EncryptedTable(  # a queued send's message, until it is sent
        OutboundMessage,
        (
            EncryptedColumn(
                "mail_sends.payload_encrypted",
                OutboundMessage.payload_encrypted,
                EncryptionKeys.PII,
                lambda row: payload_aad(row.id),
            ),
        ),
        (),
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
    failed: dict[str, set[int]] = field(default_factory=dict)
    # Ciphertexts still under an old key after the run that did not fail to decrypt:
    # written under an old key during the run by a process not yet restarted.
    remaining: int = 0

    @property
    def failed_count(self) -> int:
        return sum(len(ids) for ids in self.failed.values())

    def merge(self, other: RotationReport) -> None:
        self.rotated += other.rotated
        for name, ids in other.failed.items():
            self.failed.setdefault(name, set()).update(ids)


def rotate_table(
    table: EncryptedTable,
    report: RotationReport,
    batch_size: int,
    shard: tuple[int, int] = (0, 1),
) -> Iterator[int]:
    """Re-encrypt a table's stale ciphertexts in batches; yields rows handled per batch.

    `shard=(k, n)` takes only the rows whose id is k modulo n, so n processes can
    share a table without ever touching the same row."""
    pk = table.model.id
    keyring = get_keyring()
    current = {
        spec.name: f"v1:{keyring.current_fingerprint(spec.key_id)}:" for spec in table.columns
    }
    stale = or_(*(_stale(spec) for spec in table.columns))
    if shard[1] > 1:
        stale = stale & (pk % shard[1] == shard[0])
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
            query = query.with_for_update(of=table.model, skip_locked=True)
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
                        report.failed.setdefault(spec.name, set()).add(row.id)
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
    # One short statement, sent as a pipelined executemany (psycopg 3): no per-batch
    # statement text to parse, and no escaping of long ciphertexts into array literals.
    assignments = ", ".join(f"{name} = %s" for name in names)
    sql = f"UPDATE {table.model.__tablename__} SET {assignments} WHERE id = %s"  # noqa: S608
    db.session.connection().exec_driver_sql(sql, [(*values, row_id) for row_id, *values in changes])


SWEEPS = 3


def count_remaining(report: RotationReport) -> int:
    """Ciphertexts still under an old key, not counting those that failed to decrypt."""
    return sum(
        max(0, count_stale(spec) - len(report.failed.get(spec.name, ()))) for spec in COLUMNS
    )


def rotate_all(batch_size: int, jobs: int, progress: Callable[[str, int], None]) -> RotationReport:
    """Rotate every table, then sweep again (up to SWEEPS times, while a sweep still moves
    rows) for rows that were locked or written under an old key during the pass.

    `progress(table, rows)` is called as batches end."""
    report = _rotate_pass(batch_size, jobs, progress)
    sweeps = 0
    while True:
        report.remaining = count_remaining(report)
        db.session.rollback()
        if not report.remaining or sweeps == SWEEPS:
            return report
        sweep = _rotate_pass(batch_size, 1, lambda _name, _rows: None)
        report.merge(sweep)
        sweeps = sweeps + 1 if sweep.rotated else SWEEPS  # no progress: stop after a count


def _rotate_pass(
    batch_size: int, jobs: int, progress: Callable[[str, int], None]
) -> RotationReport:
    """One pass over every table, in `jobs` forked processes on PostgreSQL (crypto in
    Python and writes in the database then overlap)."""
    if jobs <= 1 or db.engine.dialect.name != "postgresql":
        report = RotationReport()
        for table in TABLES:
            for handled in rotate_table(table, report, batch_size):
                progress(table.model.__tablename__, handled)
        return report
    import multiprocessing

    from flask import current_app

    context = multiprocessing.get_context("fork")
    events = context.Queue()
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    db.session.remove()
    with context.Pool(jobs, initializer=_child_init, initargs=(app, events, os.getpid())) as pool:
        pending = pool.starmap_async(_rotate_shard, [(batch_size, (k, jobs)) for k in range(jobs)])
        while not pending.ready() or not events.empty():
            try:
                progress(*events.get(timeout=0.2))
            except Exception:  # noqa: S112 - queue.Empty: nothing finished in this slice
                continue
        report = RotationReport()
        for part in pending.get():
            report.merge(part)
    return report


_child: dict[str, Any] = {}


def _child_init(app: Any, events: Any, parent: int) -> None:
    """In each forked process: the inherited app and queue (never pickled); and die with
    the parent (Linux), so a killed rotation leaves no process behind."""
    _child.update(app=app, events=events)
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl: nobody will signal
            os._exit(1)
    with app.app_context():
        db.engine.dispose(close=False)  # the parent's sockets stay the parent's


def _rotate_shard(batch_size: int, shard: tuple[int, int]) -> RotationReport:
    report = RotationReport()
    with _child["app"].app_context():
        for table in TABLES:
            for handled in rotate_table(table, report, batch_size, shard):
                _child["events"].put((table.model.__tablename__, handled))
        db.session.remove()
    return report


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

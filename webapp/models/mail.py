"""Mail accounts, their folders and message envelopes, and sync runs."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from webapp.models.base import Base, TimestampMixin, UTCDateTime, utcnow

ACCOUNT_STATUSES = ("active", "error", "paused")
AUTH_METHODS = ("password", "oauth", "oauth2", "xoauth2")
OAUTH_METHODS = frozenset({"oauth", "oauth2", "xoauth2"})
SYNC_OUTCOMES = ("running", "succeeded", "failed")


class MailAccount(TimestampMixin, Base):
    __tablename__ = "mail_accounts"
    __table_args__ = (
        CheckConstraint("status IN ('active', 'error', 'paused')", name="status"),
        CheckConstraint(
            "incoming_auth_method IN ('password', 'oauth', 'oauth2', 'xoauth2')",
            name="incoming_auth_method",
        ),
        UniqueConstraint("organization_id", "user_id", "email_address", "provider"),
        Index("ix_mail_accounts_owner", "organization_id", "user_id"),
        Index("ix_mail_accounts_sync_due", "sync_enabled", "status", "last_synced_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    organization_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    email_address: Mapped[str] = mapped_column(String(255), nullable=False)
    display_name: Mapped[str | None] = mapped_column(String(255))
    provider: Mapped[str] = mapped_column(String(50), nullable=False, default="custom")
    token_id: Mapped[int | None] = mapped_column(
        ForeignKey("user_email_tokens.id", ondelete="SET NULL"), index=True
    )
    incoming_auth_method: Mapped[str] = mapped_column(String(20), nullable=False)
    incoming_server: Mapped[str] = mapped_column(String(255), nullable=False)
    incoming_port: Mapped[int] = mapped_column(Integer, nullable=False)
    incoming_security: Mapped[str] = mapped_column(String(10), nullable=False, default="ssl")
    outgoing_server: Mapped[str | None] = mapped_column(String(255))
    outgoing_port: Mapped[int | None] = mapped_column(Integer)
    outgoing_security: Mapped[str | None] = mapped_column(String(10))
    username: Mapped[str | None] = mapped_column(String(255))
    password_encrypted: Mapped[str | None] = mapped_column(Text)
    sync_enabled: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)
    status: Mapped[str] = mapped_column(String(20), nullable=False, default="active")
    last_error: Mapped[str | None] = mapped_column(Text)
    last_synced_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    def __repr__(self) -> str:
        return f"<MailAccount id={self.id} address={self.email_address} status={self.status}>"

    @property
    def uses_oauth(self) -> bool:
        return self.incoming_auth_method in OAUTH_METHODS


class MailFolder(Base):
    __tablename__ = "mail_folders"
    __table_args__ = (UniqueConstraint("account_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(
        ForeignKey("mail_accounts.id", ondelete="CASCADE"), nullable=False
    )
    name: Mapped[str] = mapped_column(String(512), nullable=False)
    delimiter: Mapped[str | None] = mapped_column(String(8))
    flags: Mapped[list[str]] = mapped_column(JSON, nullable=False, default=list)
    uidvalidity: Mapped[int | None] = mapped_column(BigInteger)
    highest_uid: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    highestmodseq: Mapped[int | None] = mapped_column(BigInteger)
    message_count: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    last_synced_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class MailMessage(Base):
    """A message envelope; the body is never stored, only an encrypted snippet."""

    __tablename__ = "mail_messages"
    __table_args__ = (
        UniqueConstraint("folder_id", "uid"),
        Index("ix_mail_messages_account_sent", "account_id", "sent_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    account_id: Mapped[int] = mapped_column(
        ForeignKey("mail_accounts.id", ondelete="CASCADE"), nullable=False
    )
    folder_id: Mapped[int] = mapped_column(
        ForeignKey("mail_folders.id", ondelete="CASCADE"), nullable=False
    )
    uid: Mapped[int] = mapped_column(BigInteger, nullable=False)
    message_id: Mapped[str | None] = mapped_column(Text)
    subject: Mapped[str | None] = mapped_column(Text)
    from_address: Mapped[str | None] = mapped_column(Text)
    to_addresses: Mapped[list[str]] = mapped_column(JSON, nullable=False, default=list)
    cc_addresses: Mapped[list[str]] = mapped_column(JSON, nullable=False, default=list)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    flags: Mapped[list[str]] = mapped_column(JSON, nullable=False, default=list)
    size: Mapped[int | None] = mapped_column(Integer)
    snippet_encrypted: Mapped[str | None] = mapped_column(Text)
    modseq: Mapped[int | None] = mapped_column(BigInteger)


class SyncRun(Base):
    __tablename__ = "sync_runs"
    __table_args__ = (
        CheckConstraint("outcome IN ('running', 'succeeded', 'failed')", name="outcome"),
        Index("ix_sync_runs_account_started", "account_id", "started_at"),
        Index("ix_sync_runs_org_started", "organization_id", "started_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    account_id: Mapped[int] = mapped_column(
        ForeignKey("mail_accounts.id", ondelete="CASCADE"), nullable=False
    )
    organization_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, nullable=False)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    outcome: Mapped[str] = mapped_column(String(20), nullable=False, default="running")
    new_count: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    updated_count: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    deleted_count: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    error: Mapped[str | None] = mapped_column(Text)

    @property
    def duration_seconds(self) -> float | None:
        if self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()


SEND_STATUSES = ("queued", "sent", "failed")


class OutboundMessage(TimestampMixin, Base):
    """The outbox: one row per send request. The message itself is PII and is kept
    encrypted only until it is sent; the Idempotency-Key is unique per account."""

    __tablename__ = "mail_sends"
    __table_args__ = (
        CheckConstraint("status IN ('queued', 'sent', 'failed')", name="status"),
        UniqueConstraint("account_id", "idempotency_key"),
        Index("ix_mail_sends_account_created", "account_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    account_id: Mapped[int] = mapped_column(
        ForeignKey("mail_accounts.id", ondelete="CASCADE"), nullable=False
    )
    organization_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    message_id: Mapped[str] = mapped_column(String(255), nullable=False)
    payload_encrypted: Mapped[str | None] = mapped_column(Text)
    recipient_count: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    status: Mapped[str] = mapped_column(String(20), nullable=False, default="queued")
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

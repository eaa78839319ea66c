"""OAuth tokens and the audit trail of their refreshes."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from webapp.models.base import Base, TimestampMixin, UTCDateTime, utcnow

if TYPE_CHECKING:
    from webapp.models.mail import MailAccount

TOKEN_STATUSES = ("active", "needs_reauth", "revoked")
TOKEN_STATUSES_REPORTED = ("active", "expired", "needs_reauth", "revoked")
REFRESH_OUTCOMES = ("success", "transient_error", "permanent_error", "config_error")


class UserEmailToken(TimestampMixin, Base):
    """One mailbox grant per (organization, user, provider, address).

    Status stored is active, needs_reauth or revoked; `expired` is derived from
    `expires_at` wherever it is reported. Both ciphertext columns are nullable
    because revoking wipes them.
    """

    __tablename__ = "user_email_tokens"
    __table_args__ = (
        UniqueConstraint("organization_id", "user_id", "provider", "email_address"),
        CheckConstraint("status IN ('active', 'needs_reauth', 'revoked')", name="status"),
        Index("ix_user_email_tokens_status_expires_at", "status", "expires_at"),
        Index("ix_user_email_tokens_org_status", "organization_id", "status", "provider"),
        Index("ix_user_email_tokens_owner", "organization_id", "user_id"),
        # Ciphertexts stay in the heap row, not TOAST (migration 0003 says why).
        {"postgresql_with": {"toast_tuple_target": 8160}},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    organization_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    provider: Mapped[str] = mapped_column(String(50), nullable=False)
    email_address: Mapped[str] = mapped_column(String(255), nullable=False)
    access_token_encrypted: Mapped[str | None] = mapped_column(Text)
    refresh_token_encrypted: Mapped[str | None] = mapped_column(Text)
    token_type: Mapped[str] = mapped_column(String(20), default="Bearer", nullable=False)
    scopes: Mapped[str] = mapped_column(Text, default="", nullable=False)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    status: Mapped[str] = mapped_column(String(50), default="active", nullable=False)
    status_reason: Mapped[str | None] = mapped_column(String(100))
    last_refreshed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    refresh_failure_count: Mapped[int] = mapped_column(Integer, default=0, nullable=False)
    last_refresh_error: Mapped[str | None] = mapped_column(Text)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    account: Mapped[MailAccount | None] = relationship(
        "MailAccount",
        primaryjoin="UserEmailToken.id == foreign(MailAccount.token_id)",
        uselist=False,
        viewonly=True,
        lazy="select",  # the API eager-loads it where it lists tokens
    )

    def __repr__(self) -> str:  # never the ciphertexts
        return (
            f"<UserEmailToken id={self.id} provider={self.provider} "
            f"address={self.email_address} status={self.status}>"
        )

    @property
    def scope_list(self) -> list[str]:
        return self.scopes.split()

    def derived_status(self, now: datetime | None = None) -> str:
        now = now or utcnow()
        if self.status == "active" and self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return self.status


class TokenRefreshAttempt(Base):
    """Every refresh attempt: the audit trail, and the source of refresh health."""

    __tablename__ = "token_refresh_attempts"
    __table_args__ = (
        CheckConstraint(
            "outcome IN ('success', 'transient_error', 'permanent_error', 'config_error')",
            name="outcome",
        ),
        Index("ix_token_refresh_attempts_org_started", "organization_id", "started_at"),
        Index("ix_token_refresh_attempts_token_started", "token_id", "started_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    token_id: Mapped[int] = mapped_column(
        ForeignKey("user_email_tokens.id", ondelete="CASCADE"), nullable=False
    )
    organization_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    provider: Mapped[str] = mapped_column(String(50), nullable=False)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, nullable=False)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    outcome: Mapped[str] = mapped_column(String(30), nullable=False)
    error_code: Mapped[str | None] = mapped_column(String(100))
    http_status: Mapped[int | None] = mapped_column(Integer)
    duration_ms: Mapped[int | None] = mapped_column(Integer)
    trigger: Mapped[str | None] = mapped_column(String(30))

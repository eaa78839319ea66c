"""SQLAlchemy models. Import from here: `from webapp.models import UserEmailToken`."""

from webapp.models.base import Base, UTCDateTime, utcnow
from webapp.models.mail import (
    MailAccount,
    MailFolder,
    MailMessage,
    OutboundMessage,
    SyncRun,
)
from webapp.models.tokens import (
    TOKEN_STATUSES_REPORTED,
    TokenRefreshAttempt,
    UserEmailToken,
)

__all__ = [
    "TOKEN_STATUSES_REPORTED",
    "Base",
    "MailAccount",
    "MailFolder",
    "MailMessage",
    "OutboundMessage",
    "SyncRun",
    "TokenRefreshAttempt",
    "UTCDateTime",
    "UserEmailToken",
    "utcnow",
]

"""SQLAlchemy models. Import from here: `from webapp.models import UserEmailToken`."""

from webapp.models.base import Base, UTCDateTime, utcnow
from webapp.models.mail import MailAccount, MailFolder, MailMessage, SyncRun
from webapp.models.tokens import TokenRefreshAttempt, UserEmailToken

__all__ = [
    "Base",
    "MailAccount",
    "MailFolder",
    "MailMessage",
    "SyncRun",
    "TokenRefreshAttempt",
    "UTCDateTime",
    "UserEmailToken",
    "utcnow",
]

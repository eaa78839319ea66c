"""The provider registry: data, not if/else chains.

Each provider's endpoints, scopes and mail hosts have defaults here and can be
overridden from the environment (`{P}_AUTHORIZE_URL`, `{P}_IMAP_HOST`, ...),
which is how tests and operators point a provider at another server.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

AddressSource = Literal["userinfo", "id_token"]
Security = Literal["ssl", "starttls"]
TokenAuthMethod = Literal["client_secret_post", "client_secret_basic"]


@dataclass(frozen=True)
class Provider:
    name: str
    env_prefix: str
    authorize_url: str
    token_url: str
    userinfo_url: str | None
    revoke_url: str | None
    scopes: tuple[str, ...]
    mail_scopes: tuple[str, ...]
    imap_host: str
    imap_port: int
    imap_security: Security
    smtp_host: str
    smtp_port: int
    smtp_security: Security
    address_source: AddressSource
    client_id: str | None = None
    client_secret: str | None = field(default=None, repr=False)
    token_auth_method: TokenAuthMethod = "client_secret_post"  # noqa: S105
    authorize_params: tuple[tuple[str, str], ...] = ()
    pkce: bool = True
    # Send `scope` (the registry's scopes) with refresh_token grants. Microsoft needs it:
    # without it the new access token may be for another resource than Outlook's.
    refresh_with_scope: bool = False

    @property
    def configured(self) -> bool:
        return bool(self.client_id)

    def missing_mail_scopes(self, granted: Iterable[str]) -> list[str]:
        """The registry's mail scopes that `granted` lacks."""
        have = set(granted)
        return [scope for scope in self.mail_scopes if scope not in have]

    @property
    def client_id_var(self) -> str:
        return f"{self.env_prefix}_CLIENT_ID"


# Defaults per provider. `{tenant}` in Microsoft's URLs is MICROSOFT_TENANT_ID.
DEFAULTS: dict[str, dict] = {
    "google": {
        "env_prefix": "GOOGLE",
        "authorize_url": "https://accounts.google.com/o/oauth2/v2/auth",
        "token_url": "https://oauth2.googleapis.com/token",
        "userinfo_url": "https://openidconnect.googleapis.com/v1/userinfo",
        "revoke_url": "https://oauth2.googleapis.com/revoke",
        "scopes": ("openid", "email", "profile", "https://mail.google.com/"),
        "mail_scopes": ("https://mail.google.com/",),
        "imap_host": "imap.gmail.com",
        "imap_port": 993,
        "imap_security": "ssl",
        "smtp_host": "smtp.gmail.com",
        "smtp_port": 465,
        "smtp_security": "ssl",
        "address_source": "userinfo",
        # Google returns a refresh token only with offline access and consent.
        "authorize_params": (("access_type", "offline"), ("prompt", "consent")),
    },
    "microsoft": {
        "env_prefix": "MICROSOFT",
        "authorize_url": "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/authorize",
        "token_url": "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token",
        "userinfo_url": None,
        "revoke_url": None,
        # Graph scopes cannot authenticate IMAP/SMTP: XOAUTH2 needs the Outlook resource.
        "scopes": (
            "openid",
            "email",
            "profile",
            "offline_access",
            "https://outlook.office.com/IMAP.AccessAsUser.All",
            "https://outlook.office.com/SMTP.Send",
        ),
        "mail_scopes": (
            "https://outlook.office.com/IMAP.AccessAsUser.All",
            "https://outlook.office.com/SMTP.Send",
        ),
        "imap_host": "outlook.office365.com",
        "imap_port": 993,
        "imap_security": "ssl",
        "smtp_host": "smtp.office365.com",
        "smtp_port": 587,
        "smtp_security": "starttls",
        "address_source": "id_token",
        "refresh_with_scope": True,
    },
    "yahoo": {
        "env_prefix": "YAHOO",
        "authorize_url": "https://api.login.yahoo.com/oauth2/request_auth",
        "token_url": "https://api.login.yahoo.com/oauth2/get_token",
        "userinfo_url": "https://api.login.yahoo.com/openid/v1/userinfo",
        "revoke_url": None,
        "scopes": ("openid", "email", "mail-w"),
        "mail_scopes": ("mail-w",),
        "imap_host": "imap.mail.yahoo.com",
        "imap_port": 993,
        "imap_security": "ssl",
        "smtp_host": "smtp.mail.yahoo.com",
        "smtp_port": 465,
        "smtp_security": "ssl",
        "address_source": "userinfo",
    },
}

PROVIDER_NAMES: tuple[str, ...] = tuple(DEFAULTS)

# Env suffix -> (field, kind). Kinds: url, url_or_empty, scopes, host, port, security, str.
OVERRIDES: dict[str, tuple[str, str]] = {
    "AUTHORIZE_URL": ("authorize_url", "url"),
    "TOKEN_URL": ("token_url", "url"),
    "USERINFO_URL": ("userinfo_url", "url_or_empty"),
    "REVOKE_URL": ("revoke_url", "url_or_empty"),
    "SCOPES": ("scopes", "scopes"),
    "MAIL_SCOPES": ("mail_scopes", "scopes"),
    "IMAP_HOST": ("imap_host", "host"),
    "IMAP_PORT": ("imap_port", "port"),
    "IMAP_SECURITY": ("imap_security", "security"),
    "SMTP_HOST": ("smtp_host", "host"),
    "SMTP_PORT": ("smtp_port", "port"),
    "SMTP_SECURITY": ("smtp_security", "security"),
    "CLIENT_ID": ("client_id", "str"),
    "CLIENT_SECRET": ("client_secret", "str"),
    "TOKEN_AUTH_METHOD": ("token_auth_method", "auth_method"),
}

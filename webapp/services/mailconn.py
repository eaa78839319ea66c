"""IMAP and SMTP connections: TLS always verified, XOAUTH2 or password login.

An authentication failure is retried once after a forced token refresh; if it
still fails the caller gets `MailAuthFailed` with the server's message. A grant
that the refresh finds dead surfaces as NeedsReauth / TokenRevoked.
"""

from __future__ import annotations

import base64
import functools
import imaplib
import ipaddress
import logging
import smtplib
import socket
import ssl
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from flask import current_app
from imapclient import IMAPClient, imap4, tls
from imapclient.exceptions import LoginError

from webapp.crypto import decrypt_field
from webapp.errors import HostNotAllowed, ProviderUnavailable
from webapp.models import MailAccount
from webapp.services.imapfetch import FetchError
from webapp.services.keys import account_password_aad
from webapp.services.tokens import get_valid_access_token

# Errors worth retrying later: the network or the server, not the credentials.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    socket.timeout,
    TimeoutError,
    ConnectionError,
    imaplib.IMAP4.abort,
    FetchError,  # a NO to FETCH: "Some messages could not be FETCHed" is Gmail's way of "later"
    smtplib.SMTPServerDisconnected,
    smtplib.SMTPConnectError,
)


class MailAuthFailed(Exception):
    """The server refused the login even after a forced refresh."""

    def __init__(self, server_message: str) -> None:
        self.server_message = server_message[:500]
        super().__init__(self.server_message)


class MailAuthUnsupported(MailAuthFailed):
    """The server does not offer the mechanism the account needs: no refresh helps."""


def is_transient(error: BaseException) -> bool:
    if isinstance(error, ProviderUnavailable):
        return True  # the token could not be refreshed right now
    if isinstance(error, ssl.SSLCertVerificationError):
        return False  # a certificate problem needs an operator, not a retry
    if isinstance(error, smtplib.SMTPResponseException):
        return 400 <= error.smtp_code < 500
    if isinstance(error, smtplib.SMTPException) and not isinstance(error, TRANSIENT_ERRORS):
        return False  # no STARTTLS, no usable AUTH: an SMTPException is an OSError
    return isinstance(error, TRANSIENT_ERRORS) or (
        isinstance(error, OSError) and not isinstance(error, ssl.SSLError)
    )


def tls_context() -> ssl.SSLContext:
    """TLS 1.2+, certificate and host name verified; MAIL_CA_FILE adds a CA."""
    return _tls_context(current_app.config.get("MAIL_CA_FILE"))


@functools.lru_cache(maxsize=4)
def _tls_context(ca_file: str | None) -> ssl.SSLContext:
    """Built once per process: loading the system CA store costs ~40 ms."""
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def check_user_host(host: str, port: int, field: str) -> str | None:
    """Hosts typed in by users must not reach private networks (no port scanning).

    Returns the checked address to connect to, or None when private hosts are allowed
    (connect by name). Connecting to that address, not to what the name resolves to a
    moment later, closes the DNS-rebinding window between this check and the connect.
    """
    allowed_ports = current_app.config["MAIL_ALLOWED_PORTS"]
    if port not in allowed_ports:
        raise HostNotAllowed(
            f"port {port} is not allowed (MAIL_ALLOWED_PORTS)",
            fields={field: [f"port must be one of {', '.join(map(str, allowed_ports))}"]},
        )
    if current_app.config["MAIL_ALLOW_PRIVATE_HOSTS"]:
        return None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise HostNotAllowed(
            f"{host} does not resolve", fields={field: ["host does not resolve"]}
        ) from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not address.is_global:
            raise HostNotAllowed(
                f"{host} resolves to a private, loopback or link-local address",
                fields={field: ["host resolves to a non-public address"]},
            )
    return str(infos[0][4][0])


def _vetted_address(account: MailAccount, host: str, port: int, field: str) -> str | None:
    """Registry hosts (OAuth accounts) are operator config; hosts a user typed are
    checked again at every connection, since their DNS may change after the account
    was saved."""
    return None if account.uses_oauth else check_user_host(host, port, field)


def xoauth2_string(user: str, access_token: str) -> str:
    return f"user={user}\x01auth=Bearer {access_token}\x01\x01"


def _password(account: MailAccount) -> str:
    if not account.password_encrypted:
        raise MailAuthFailed("no password stored for this account")
    return decrypt_field(account.password_encrypted, "pii", account_password_aad(account))


def _with_auth_retry(account: MailAccount, login: Callable[[str | None], Any]) -> Any:
    """Log in; on a refused OAuth login refresh the token once and try again."""
    if not account.uses_oauth:
        return login(None)
    if account.token_id is None:
        raise MailAuthFailed("the account has no OAuth token")
    try:
        return login(get_valid_access_token(account.token_id))
    except MailAuthUnsupported:
        raise
    except MailAuthFailed:
        return login(get_valid_access_token(account.token_id, force_refresh=True))


# --- IMAP ---------------------------------------------------------------------------------


class _PinnedIMAP4(imap4.IMAP4WithTimeout):
    """Plain IMAP (before STARTTLS) to a vetted address; IMAPClient's STARTTLS still
    checks the certificate against the host name."""

    def __init__(self, address: str, host: str, port: int, timeout: float | None) -> None:
        self._address = address
        super().__init__(host, port, timeout)

    def _create_socket(self, timeout: float | None = None) -> socket.socket:
        return socket.create_connection((self._address, self.port), timeout or self._timeout)


class _PinnedIMAP4TLS(tls.IMAP4_TLS):
    """IMAP over TLS to a vetted address, the certificate checked against the host name."""

    def __init__(self, address: str, host: str, port: int, context: Any, timeout: Any) -> None:
        self._address = address
        super().__init__(host, port, context, timeout)

    def _create_socket(self, timeout: float | None = None) -> socket.socket:
        sock = socket.create_connection((self._address, self.port), timeout or self._timeout)
        return tls.wrap_socket(sock, self.ssl_context, self.host)


class _PinnedIMAPClient(IMAPClient):
    """IMAPClient connecting to `address` when one is given, else to the host name.

    Always through the classes above: IMAPClient's own IMAP4_TLS (3.1) drops the
    timeout, so a server that accepts and then stalls held the TLS handshake and the
    greeting, and with them the worker and the account's sync lock, for good."""

    def __init__(self, address: str | None, host: str, **kwargs: Any) -> None:
        self._address = address
        super().__init__(host, **kwargs)

    def _create_IMAP4(self) -> Any:
        address = self._address or self.host
        timeout = getattr(self._timeout, "connect", None)
        if self.ssl:
            return _PinnedIMAP4TLS(address, self.host, self.port, self.ssl_context, timeout)
        return _PinnedIMAP4(address, self.host, self.port, timeout)


def _imap_open(host: str, port: int, security: str, address: str | None = None) -> IMAPClient:
    timeout = current_app.config["MAIL_TIMEOUT_SECONDS"]
    context = tls_context()
    if security == "starttls":
        client = _PinnedIMAPClient(address, host, port=port, ssl=False, timeout=timeout)
        client.starttls(context)
    else:
        client = _PinnedIMAPClient(
            address, host, port=port, ssl=True, ssl_context=context, timeout=timeout
        )
    client.normalise_times = False
    if not logging.getLogger("imapclient.imaplib").isEnabledFor(logging.DEBUG):
        # IMAPClient sets imaplib's debug level to 5, which formats the repr of every
        # line and literal it reads (the whole message, in a bulk fetch) for a logger
        # that drops it: about a third of an initial sync's CPU. Off unless it listens.
        client._imap.debug = 0  # noqa: SLF001
    return client


def _imap_login(account: MailAccount, access_token: str | None) -> IMAPClient:
    host, port = account.incoming_server, account.incoming_port
    address = _vetted_address(account, host, port, "imap_host")
    client = _imap_open(host, port, account.incoming_security, address)
    try:
        if access_token is not None:
            xoauth2_login(client, account.username or account.email_address, access_token)
        else:
            client.login(account.username or account.email_address, _password(account))
    except LoginError as exc:
        _quietly(client.logout)
        raise MailAuthFailed(_text(exc)) from None
    except BaseException:
        _quietly(client.logout)
        raise
    return client


class _EndExchange:
    def respond(self, _challenge: bytes) -> bytes:
        """The empty response to any challenge (not decoded: it need not be base64)."""
        return b""


def xoauth2_login(client: IMAPClient, user: str, access_token: str) -> None:
    """AUTHENTICATE XOAUTH2, with the initial response on the command line where the
    server offers SASL-IR (RFC 4959): GreenMail and others answer a bare AUTHENTICATE
    XOAUTH2 with BAD instead of a continuation. A refusal may come as a challenge
    first (Gmail sends its error as JSON): the empty response ends the exchange and
    the tagged NO follows, in both forms."""
    capabilities = client.capabilities()  # one CAPABILITY round trip at most
    if b"AUTH=XOAUTH2" not in capabilities:  # a forced refresh would not help
        offered = [c.decode() for c in capabilities if c.startswith(b"AUTH=")]
        raise MailAuthUnsupported(
            f"the IMAP server does not offer XOAUTH2 ({' '.join(offered) or 'no AUTH='})"
        )
    initial = xoauth2_string(user, access_token).encode()
    if b"SASL-IR" not in capabilities:
        challenges = iter([initial])
        client.sasl_login("XOAUTH2", lambda _challenge: next(challenges, b""))
        return
    imap = client._imap  # noqa: SLF001 - IMAPClient's own connection; imaplib has no SASL-IR
    imap.literal = _EndExchange().respond  # imaplib sends what a bound method returns
    try:
        typ, data = imap._simple_command(  # noqa: SLF001
            "AUTHENTICATE", "XOAUTH2", base64.b64encode(initial).decode("ascii")
        )
    except imaplib.IMAP4.abort:
        raise  # the connection failed: not a refusal of the token
    except imaplib.IMAP4.error as exc:  # BAD: the one-line form itself, not the token
        raise MailAuthUnsupported(f"the IMAP server refused AUTHENTICATE XOAUTH2: {exc}") from None
    if typ != "OK":
        raise LoginError(_text(data[-1] if data else typ))
    imap.state = "AUTH"


@contextmanager
def imap_session(account: MailAccount) -> Iterator[IMAPClient]:
    client = _with_auth_retry(account, lambda token: _imap_login(account, token))
    try:
        yield client
    finally:
        _quietly(client.logout)


def try_imap_login(
    host: str, port: int, security: str, username: str, password: str, *, address: str | None
) -> None:
    """Used before saving a password account, with the address `check_user_host` vetted:
    raises MailAuthFailed or a network error."""
    client = _imap_open(host, port, security, address)
    try:
        client.login(username, password)
    except LoginError as exc:
        raise MailAuthFailed(_text(exc)) from None
    finally:
        _quietly(client.logout)


# --- SMTP ---------------------------------------------------------------------------------


class _PinnedSMTP(smtplib.SMTP):
    """SMTP to a vetted address when one is given; TLS checks the host name (`_host`)."""

    def __init__(self, address: str | None, *args: Any, **kwargs: Any) -> None:
        self._address = address
        super().__init__(*args, **kwargs)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        return super()._get_socket(self._address or host, port, timeout)  # type: ignore[misc]


class _PinnedSMTPSSL(_PinnedSMTP, smtplib.SMTP_SSL):
    pass


def _smtp_open(host: str, port: int, security: str, address: str | None = None) -> smtplib.SMTP:
    timeout = current_app.config["MAIL_TIMEOUT_SECONDS"]
    context = tls_context()
    if security == "ssl":
        smtp: smtplib.SMTP = _PinnedSMTPSSL(address, host, port, timeout=timeout, context=context)
    else:
        smtp = _PinnedSMTP(address, host, port, timeout=timeout)
        smtp.ehlo()
        smtp.starttls(context=context)
    smtp.ehlo()
    return smtp


def _smtp_login(account: MailAccount, access_token: str | None) -> smtplib.SMTP:
    if not account.outgoing_server or not account.outgoing_port:
        raise MailAuthFailed("the account has no SMTP server configured")
    host, port = account.outgoing_server, account.outgoing_port
    address = _vetted_address(account, host, port, "smtp_host")
    smtp = _smtp_open(host, port, account.outgoing_security or "starttls", address)
    user = account.username or account.email_address
    try:
        if access_token is not None:
            offered = smtp.esmtp_features.get("auth", "")
            if "XOAUTH2" not in offered.upper().split():
                raise MailAuthUnsupported(
                    f"the SMTP server does not offer XOAUTH2 (AUTH: {offered.strip() or 'none'})"
                )
            answers = iter([xoauth2_string(user, access_token), ""])
            # On failure the server sends a 334 challenge with error details and
            # expects an empty line before its final 535.
            smtp.auth("XOAUTH2", lambda _challenge=None: next(answers, ""))
        else:
            smtp.login(user, _password(account))
    except smtplib.SMTPAuthenticationError as exc:
        _quietly(smtp.quit)
        raise MailAuthFailed(_text(exc.smtp_error)) from None
    except BaseException:
        _quietly(smtp.close)
        raise
    return smtp


@contextmanager
def smtp_session(account: MailAccount) -> Iterator[smtplib.SMTP]:
    smtp = _with_auth_retry(account, lambda token: _smtp_login(account, token))
    try:
        yield smtp
    finally:
        _quietly(smtp.quit)


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _quietly(action: Callable[[], Any]) -> None:
    try:
        action()
    except Exception:  # noqa: S110 - closing a connection that may already be gone
        pass

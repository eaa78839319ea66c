"""Token storage, refresh, use and revocation: one module for the API, tasks and CLIs.

Invariants:
- one refresh per token in flight across every process and host (Redis lock);
- after taking the lock the row is re-read, and a refresh someone else finished
  while this one waited is not repeated;
- a rotated refresh token is committed in the same transaction as the new access
  token, with nothing but encryption between the provider's answer and the commit;
- every attempt is recorded in token_refresh_attempts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cached_property
from typing import Any, TypeAlias, cast

import requests
from flask import current_app
from sqlalchemy import Connection, Table, bindparam, func, insert, select, update
from sqlalchemy.orm import selectinload

from webapp.crypto import DecryptionError, aad_for, decrypt_aes_gcm, encrypt_aes_gcm
from webapp.errors import (
    NeedsReauth,
    NotFound,
    ProviderConfigError,
    ProviderUnavailable,
    TokenRevoked,
)
from webapp.extensions import db, redis_store
from webapp.logs import REDACTED
from webapp.metrics import TOKEN_REFRESH_SECONDS, TOKEN_REFRESH_TOTAL
from webapp.models import MailAccount, TokenRefreshAttempt, UserEmailToken, utcnow
from webapp.providers import Provider
from webapp.services.provider_http import ProviderFailure, client_auth, parse_scope, token_request

log = logging.getLogger("mailkey.tokens")

ACCESS_COLUMN = "access_token_encrypted"
REFRESH_COLUMN = "refresh_token_encrypted"
MIN_VALIDITY = timedelta(minutes=5)
MAX_EXPIRES_IN = 366 * 24 * 3600
# A Core row of user_email_tokens, read where the ORM object's load is not needed. It has
# the ORM object's attribute names, and the helpers that read a token accept either.
TokenRow: TypeAlias = Any
# Built once for the refresh hot path: plain Core, no ORM load or flush, no RETURNING.
_TOKENS = cast(Table, UserEmailToken.__table__)
_ATTEMPTS = cast(Table, TokenRefreshAttempt.__table__)
_SELECT_TOKEN = select(_TOKENS).where(_TOKENS.c.id == bindparam("row_id"))
_INSERT_ATTEMPT = insert(_ATTEMPTS).inline()
# What a successful refresh writes; a None refresh token or scope keeps the stored one.
_REFRESHED_COLUMNS = (ACCESS_COLUMN, REFRESH_COLUMN, "expires_at", "token_type", "scopes")
_KEPT_WHEN_NONE = (REFRESH_COLUMN, "scopes")


def _new(name: str) -> Any:
    value = bindparam(f"new_{name}", type_=_TOKENS.c[name].type)
    return func.coalesce(value, _TOKENS.c[name]) if name in _KEPT_WHEN_NONE else value


_REFRESHED_AT = bindparam("new_refreshed_at", type_=_TOKENS.c.last_refreshed_at.type)
_STORE_TOKEN = (
    update(_TOKENS)
    .where(_TOKENS.c.id == bindparam("row_id"))
    .values(
        {
            **{name: _new(name) for name in _REFRESHED_COLUMNS},
            # updated_at is set here: SQLAlchemy leaves an UPDATE's Python-side onupdate
            # unset when the statement carries a data-modifying WITH.
            "last_refreshed_at": _REFRESHED_AT,
            "updated_at": _REFRESHED_AT,
            "refresh_failure_count": 0,
            "last_refresh_error": None,
            "status_reason": None,
        }
    )
)
# PostgreSQL: the attempt row rides along in a data-modifying WITH, so the success path's
# write is one statement, one round trip and one commit.
_STORE_SUCCESS = _STORE_TOKEN.add_cte(
    insert(_ATTEMPTS)
    .values(
        {
            name: bindparam(f"attempt_{name}", type_=column.type)
            for name, column in _ATTEMPTS.c.items()
            if name != "id"
        }
    )
    .cte("attempt")
)


def provider_for(name: str) -> Provider:
    provider = current_app.config["PROVIDERS"].get(name)
    if provider is None:
        raise NotFound(f"unknown provider {name!r}")
    return provider


# --- ciphertext columns -------------------------------------------------------------------


def _aad(token: UserEmailToken, column: str) -> str:
    return aad_for(
        token.organization_id, token.user_id, token.provider, token.email_address, column
    )


def _sealed(token: UserEmailToken, access_token: str, refresh_token: str | None) -> dict[str, str]:
    """The ciphertext column values; no refresh column for a None refresh token."""
    values = {
        ACCESS_COLUMN: encrypt_aes_gcm(access_token, key_id="oauth", aad=_aad(token, ACCESS_COLUMN))
    }
    if refresh_token is not None:
        values[REFRESH_COLUMN] = encrypt_aes_gcm(
            refresh_token, key_id="oauth_refresh", aad=_aad(token, REFRESH_COLUMN)
        )
    return values


def store_secrets(token: UserEmailToken, access_token: str, refresh_token: str | None) -> None:
    """Encrypt into the row. A None refresh token keeps the stored one."""
    _set_columns(token, _sealed(token, access_token, refresh_token))


def read_access_token(token: UserEmailToken) -> str:
    if token.access_token_encrypted is None:
        raise DecryptionError("no access token stored")
    return decrypt_aes_gcm(token.access_token_encrypted, "oauth", _aad(token, ACCESS_COLUMN))


def read_refresh_token(token: UserEmailToken) -> str | None:
    if token.refresh_token_encrypted is None:
        return None
    return decrypt_aes_gcm(
        token.refresh_token_encrypted, "oauth_refresh", _aad(token, REFRESH_COLUMN)
    )


def token_response_values(
    token: UserEmailToken, answer: dict[str, Any], now: datetime
) -> dict[str, Any]:
    """The row's new column values for a token endpoint answer (secrets encrypted)."""
    values: dict[str, Any] = _sealed(
        token, answer["access_token"], answer.get("refresh_token") or None
    )
    try:  # servers send 3600, 3600.0, "3600" or nothing
        expires_in = int(float(answer.get("expires_in", 3600)))
    except (TypeError, ValueError, OverflowError):
        expires_in = 3600
    values["expires_at"] = now + timedelta(seconds=min(max(expires_in, 0), MAX_EXPIRES_IN))
    values["token_type"] = str(answer.get("token_type") or "Bearer")[:20]
    scopes = parse_scope(answer.get("scope"))
    if scopes:
        values["scopes"] = " ".join(scopes)
    return values


def apply_token_response(token: UserEmailToken, answer: dict[str, Any], now: datetime) -> None:
    """Copy a token endpoint answer into the row (encrypting the secrets)."""
    _set_columns(token, token_response_values(token, answer, now))


def _set_columns(token: UserEmailToken, values: dict[str, Any]) -> None:
    for column, value in values.items():
        setattr(token, column, value)


# --- lookups ------------------------------------------------------------------------------


def get_owned_token(owner: tuple[int, int], token_id: int) -> UserEmailToken:
    """Another owner's token is indistinguishable from a missing one (404)."""
    token = db.session.get(UserEmailToken, token_id)
    if token is None or (token.organization_id, token.user_id) != owner:
        raise NotFound("no such token")
    return token


# --- state changes ------------------------------------------------------------------------


def _pause_accounts(token_id: int, reason: str) -> None:
    db.session.execute(
        update(MailAccount)
        .where(MailAccount.token_id == token_id)
        .values(status="paused", last_error=reason, updated_at=utcnow())
    )


def mark_needs_reauth(token: UserEmailToken, reason: str) -> None:
    token.status = "needs_reauth"
    token.status_reason = reason
    _pause_accounts(token.id, f"token needs re-authorization ({reason})")


def ensure_usable(token: UserEmailToken) -> None:
    if token.status == "revoked":
        raise TokenRevoked(reason=token.status_reason or "revoked")
    if token.status == "needs_reauth":
        raise NeedsReauth(reason=token.status_reason)


def _unusable_ciphertext(token: UserEmailToken) -> NeedsReauth:
    """A ciphertext that no key opens: the token is unusable until reconnected."""
    mark_needs_reauth(token, "decryption_failed")
    db.session.commit()
    log.error(
        "token_decryption_failed", extra={"event": "token_decryption_failed", "token_id": token.id}
    )
    return NeedsReauth(
        "the stored token cannot be decrypted; the mailbox must be reconnected",
        reason="decryption_failed",
    )


# --- refresh ------------------------------------------------------------------------------


@dataclass
class RefreshResult:
    token_id: int
    refreshed: bool  # False: skipped (not due, or someone else refreshed it meanwhile)

    @cached_property
    def token(self) -> UserEmailToken:
        """The row as stored now, loaded on first use (the task and the CLI never ask)."""
        token = db.session.get(UserEmailToken, self.token_id, populate_existing=True)
        if token is None:
            raise NotFound("no such token")
        return token


@dataclass
class _Attempt:
    """One refresh attempt, from the stored row to what the provider answered."""

    row: TokenRow  # the token row read under the lock (attributes as on the ORM object)
    provider: Provider
    trigger: str
    unusable: str | None = None  # nothing was sent: decryption_failed or no_refresh_token
    refresh_secret: str = ""
    failure: ProviderFailure | None = None
    changes: dict[str, Any] = field(default_factory=dict)  # the token row's new values
    record: dict[str, Any] = field(default_factory=dict)  # its token_refresh_attempts row
    elapsed: float = 0.0

    @property
    def succeeded(self) -> bool:
        return self.unusable is None and self.failure is None


def _token_lock(token_id: int) -> Any:
    """The per-token lock every refresh and revoke takes, waiting up to its timeout."""
    timeout = current_app.config["REFRESH_LOCK_SECONDS"]
    return redis_store.locked(f"mailkey:lock:refresh:{token_id}", timeout, wait=timeout + 5)


def _busy() -> ProviderUnavailable:
    return ProviderUnavailable(
        "another refresh of this token is still running", headers={"Retry-After": "5"}
    )


@contextmanager
def _own_connection() -> Iterator[Connection]:
    """A pooled connection outside the session for the refresh's read and write. On
    PostgreSQL each statement commits on its own: no BEGIN round trip, and no transaction
    held open while the provider answers."""
    with db.engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn.execution_options(isolation_level="AUTOCOMMIT")
        yield conn


def refresh_token(
    token_id: int,
    *,
    trigger: str = "api",
    force: bool = True,
    ahead: timedelta = MIN_VALIDITY,
    requested_at: datetime | None = None,
) -> RefreshResult:
    """Refresh one token now. `force=False` skips a token valid for longer than `ahead`.

    A token refreshed at or after `requested_at` (default: now) is not refreshed again,
    forced or not: a task redelivered after its worker died, or retried after someone
    else refreshed the token, passes the time it was first queued and skips.

    The success path, the one that runs all day, costs four round trips besides the
    provider's: the lock, the row, one statement writing the new tokens and the attempt
    together, the unlock. Failures are written through the ORM session.

    Raises NeedsReauth / TokenRevoked (409), ProviderConfigError (502) or
    ProviderUnavailable (503, with the provider's Retry-After).
    """
    requested_at = requested_at or utcnow()
    # The caller's session transaction ends here (the API and get_valid_access_token
    # read the row first): it must not hold a second pooled connection, or a lock on this
    # row, while the provider answers. A task or the CLI has no session yet: creating one
    # only to commit nothing would cost more than any other step but the round trips.
    if db.session.registry.has():
        db.session.commit()
    with _token_lock(token_id) as acquired:
        if not acquired:
            raise _busy()
        with _own_connection() as conn:
            row: TokenRow = conn.execute(_SELECT_TOKEN, {"row_id": token_id}).one_or_none()
            if row is None:
                raise NotFound("no such token")
            ensure_usable(row)
            if row.last_refreshed_at and row.last_refreshed_at >= requested_at:
                return RefreshResult(token_id, refreshed=False)
            if not force and row.expires_at and row.expires_at - utcnow() > ahead:
                return RefreshResult(token_id, refreshed=False)
            attempt = _call_provider(row, trigger)
            if attempt.succeeded:
                _store_success(conn, attempt)
        if attempt.succeeded:
            _report(attempt, "success", None)
            return RefreshResult(token_id, refreshed=True)
        # Still under the lock, with the connection back in the pool.
        return _store_failure(attempt)


def _call_provider(row: TokenRow, trigger: str) -> _Attempt:
    """Send the stored refresh token to the provider; nothing is written here."""
    provider = provider_for(row.provider)
    attempt = _Attempt(row, provider, trigger)
    if not provider.configured:
        # Never send a user's refresh token to a provider without Mailkey's client id;
        # the token is left as it is and nothing is counted against it.
        log.error(
            "provider_not_configured",
            extra={
                "event": "provider_not_configured",
                "token_id": row.id,
                "provider": row.provider,
            },
        )
        raise ProviderConfigError(
            f"provider {provider.name} is not configured: set {provider.client_id_var}",
            reason="provider_not_configured",
        )
    try:
        refresh_secret = read_refresh_token(row)
    except DecryptionError:
        attempt.unusable = "decryption_failed"
        return attempt
    if refresh_secret is None:
        attempt.unusable = "no_refresh_token"
        return attempt
    attempt.refresh_secret = refresh_secret
    started_at = utcnow()
    clock = time.perf_counter()
    answer: dict[str, Any] = {}
    try:
        grant = {"grant_type": "refresh_token", "refresh_token": refresh_secret}
        if provider.refresh_with_scope:
            grant["scope"] = " ".join(provider.scopes)
        answer = token_request(
            provider, grant, timeout=current_app.config["PROVIDER_TIMEOUT_SECONDS"]
        )
    except ProviderFailure as exc:
        attempt.failure = exc
    finished_at = utcnow()
    attempt.elapsed = time.perf_counter() - clock
    attempt.record = {
        "token_id": row.id,
        "organization_id": row.organization_id,
        "provider": row.provider,
        "started_at": started_at,
        "finished_at": finished_at,
        "duration_ms": int(attempt.elapsed * 1000),
        "trigger": trigger,
        "outcome": "success",
        "http_status": 200,
        "error_code": None,
    }
    if attempt.failure is None:
        # Nothing but encryption between the provider's answer and the commit.
        attempt.changes = token_response_values(row, answer, finished_at)
        # An answer whose grant no longer covers mail: the new tokens are kept (a rotated
        # refresh token has replaced the old one), but the mailbox must be connected
        # again, as the callback would have refused such a grant.
        attempt.failure = _mail_scope_lost(provider, attempt.changes.get("scopes"))
    if attempt.failure is not None:
        attempt.record.update(
            outcome=attempt.failure.outcome,
            http_status=attempt.failure.http_status,
            error_code=attempt.failure.error_code[:100],
        )
    return attempt


def _store_success(conn: Connection, attempt: _Attempt) -> None:
    """The new tokens, the expiry and the attempt row, committed together."""
    values = {
        "row_id": attempt.row.id,
        "new_refreshed_at": attempt.record["finished_at"],
        **{f"new_{name}": attempt.changes.get(name) for name in _REFRESHED_COLUMNS},
    }
    if conn.dialect.name == "postgresql":
        # One statement: one round trip, one commit.
        values.update({f"attempt_{name}": value for name, value in attempt.record.items()})
        conn.execute(_STORE_SUCCESS, values)
    else:
        conn.execute(_INSERT_ATTEMPT, attempt.record)
        conn.execute(_STORE_TOKEN, values)
        conn.commit()


def _store_failure(attempt: _Attempt) -> RefreshResult:
    """Record a failed attempt on the ORM row and raise the API error it maps to (or,
    for a refresh token that was replaced meanwhile, answer "not refreshed")."""
    token = db.session.get(UserEmailToken, attempt.row.id, populate_existing=True)
    if token is None:
        raise NotFound("no such token")
    if attempt.unusable == "decryption_failed":
        raise _unusable_ciphertext(token)
    if attempt.unusable == "no_refresh_token":
        if token.expires_at is not None and token.expires_at <= utcnow():
            mark_needs_reauth(token, "no_refresh_token")
            db.session.commit()
        raise NeedsReauth(
            "the provider issued no refresh token; the mailbox must be reconnected",
            reason="no_refresh_token",
        )
    failure = cast(ProviderFailure, attempt.failure)
    scope_lost = bool(attempt.changes)
    # A refusal of a refresh token that was replaced while this attempt ran (by a
    # process that took the lock after ours expired) says nothing about the grant,
    # which lives on under the newer token: leave the row to that process.
    stale = (
        failure.kind == "permanent"
        and not scope_lost
        and _rotated_meanwhile(attempt.row, token.refresh_token_encrypted, attempt.refresh_secret)
    )
    if scope_lost:
        _set_columns(token, attempt.changes)
    if not stale:
        token.refresh_failure_count += 1
        # Some servers echo what they were sent in error_description.
        token.last_refresh_error = _scrub(
            failure.summary, attempt.refresh_secret, attempt.provider.client_secret or ""
        )
        if failure.kind == "permanent":
            mark_needs_reauth(token, failure.error_code)
    db.session.execute(_INSERT_ATTEMPT, attempt.record)
    db.session.commit()
    _report(attempt, failure.outcome, attempt.record["error_code"])
    if stale:
        log.warning(
            "refresh_token_replaced_meanwhile",
            extra={"event": "refresh_token_replaced_meanwhile", "token_id": token.id},
        )
        return RefreshResult(token.id, refreshed=False)
    raise _api_error(failure)


def _report(attempt: _Attempt, outcome: str, error_code: str | None) -> None:
    provider = attempt.row.provider
    TOKEN_REFRESH_TOTAL.labels(provider, outcome).inc()
    TOKEN_REFRESH_SECONDS.labels(provider).observe(attempt.elapsed)
    log.info(
        "token_refresh",
        extra={
            "event": "token_refresh",
            "token_id": attempt.row.id,
            "provider": provider,
            "outcome": outcome,
            "error_code": error_code,
            "trigger": attempt.trigger,
        },
    )


def _mail_scope_lost(provider: Provider, scopes: str | None) -> ProviderFailure | None:
    """A refresh answer whose `scope` lacks a mail scope (no `scope`: unchanged)."""
    missing = provider.missing_mail_scopes(scopes.split()) if scopes else None
    if not missing:
        return None
    return ProviderFailure(
        "permanent", "mail_scope_missing", 200, None, f"not granted: {' '.join(missing)}"
    )


def _rotated_meanwhile(row: TokenRow, stored: str | None, sent: str) -> bool:
    """Whether the refresh token stored now (`stored`) is no longer the one this attempt
    read in `row` and sent. The plaintexts are compared: `flask keys rotate` changes the
    ciphertext alone."""
    if stored is None or stored == row.refresh_token_encrypted:
        return False
    try:
        current = decrypt_aes_gcm(stored, "oauth_refresh", _aad(row, REFRESH_COLUMN))
    except DecryptionError:
        return False
    return current != sent


def _scrub(text: str, *secrets: str) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


def _api_error(failure: ProviderFailure) -> Exception:
    if failure.kind == "permanent":
        return NeedsReauth(reason=failure.error_code)
    if failure.kind == "configuration":
        log.error(
            "provider_config_error",
            extra={"event": "provider_config_error", "error_code": failure.error_code},
        )
        return ProviderConfigError(
            f"the provider rejected Mailkey's client configuration ({failure.error_code})",
            reason=failure.error_code,
        )
    retry_after = max(1, int(failure.retry_after or 0) or 5)
    error = ProviderUnavailable(
        f"the provider is temporarily unavailable ({failure.error_code})",
        reason=failure.error_code,
        headers={"Retry-After": str(retry_after)},
    )
    error.provider_retry_after = failure.retry_after  # type: ignore[attr-defined]
    return error


def get_valid_access_token(token_id: int, *, force_refresh: bool = False) -> str:
    """An access token good for at least five more minutes; refreshes first when needed."""
    token = db.session.get(UserEmailToken, token_id, populate_existing=True)
    if token is None:
        raise NotFound("no such token")
    ensure_usable(token)
    stale = token.expires_at is None or token.expires_at - utcnow() < MIN_VALIDITY
    if force_refresh or stale:
        token = refresh_token(token_id, trigger="use", force=force_refresh).token
    try:
        secret = read_access_token(token)
    except DecryptionError:
        raise _unusable_ciphertext(token) from None
    db.session.execute(
        update(UserEmailToken).where(UserEmailToken.id == token_id).values(last_used_at=utcnow())
    )
    db.session.commit()
    return secret


# --- revoke -------------------------------------------------------------------------------


def revoke(owner: tuple[int, int], token_id: int) -> tuple[UserEmailToken, bool, str]:
    """Revoke at the provider where it has an endpoint, then wipe the secrets locally.

    Returns (token, provider_revoked, message). Repeating it is harmless.
    """
    with _token_lock(token_id) as acquired:
        if not acquired:
            raise _busy()
        token = get_owned_token(owner, token_id)
        db.session.refresh(token)
        if token.status == "revoked":
            return token, False, "the token was already revoked"
        provider = provider_for(token.provider)
        provider_revoked, message = _revoke_at_provider(provider, token)
        token.access_token_encrypted = None
        token.refresh_token_encrypted = None
        token.status = "revoked"
        token.status_reason = "revoked_by_user"
        token.revoked_at = utcnow()
        _pause_accounts(token.id, "token revoked")
        db.session.commit()
        log.info(
            "token_revoked",
            extra={
                "event": "token_revoked",
                "token_id": token.id,
                "provider_revoked": provider_revoked,
            },
        )
        return token, provider_revoked, message


def _revoke_at_provider(provider: Provider, token: UserEmailToken) -> tuple[bool, str]:
    if not provider.revoke_url:
        return False, (
            f"{provider.name} has no token revocation endpoint; the token was revoked in "
            "Mailkey only (the user can remove the app's access in their account settings)"
        )
    try:
        secret = read_refresh_token(token) or read_access_token(token)
    except DecryptionError:
        return False, "the stored token could not be decrypted; revoked in Mailkey only"
    hint = "refresh_token" if token.refresh_token_encrypted else "access_token"  # noqa: S105
    data = {"token": secret, "token_type_hint": hint}
    # RFC 7009 2.1: the client authenticates as it does at the token endpoint.
    auth = client_auth(provider, data)
    try:
        response = requests.post(
            provider.revoke_url,
            data=data,
            auth=auth,
            timeout=current_app.config["PROVIDER_TIMEOUT_SECONDS"],
        )
    except requests.RequestException:
        return False, "the provider could not be reached; the token was revoked in Mailkey only"
    if response.status_code < 400:
        return True, "revoked at the provider and in Mailkey"
    return False, (
        f"the provider answered HTTP {response.status_code}; the token was revoked in Mailkey only"
    )


def list_tokens(
    owner: tuple[int, int],
    *,
    provider: str | None = None,
    status: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> dict[str, Any]:
    from webapp.services.pagination import paginate

    query = (
        select(UserEmailToken)
        .options(selectinload(UserEmailToken.account))
        .where(UserEmailToken.organization_id == owner[0], UserEmailToken.user_id == owner[1])
    )
    if provider:
        query = query.where(UserEmailToken.provider == provider)
    if status:
        query = query.where(status_filter(status, utcnow()))
    return paginate(query, UserEmailToken.id, limit, cursor)


def status_filter(status: str, now: datetime) -> Any:
    """SQL condition for a reported status (`expired` and `active` are derived)."""
    stored_active = UserEmailToken.status == "active"
    if status == "expired":
        return stored_active & (UserEmailToken.expires_at <= now)
    if status == "active":
        return stored_active & (
            UserEmailToken.expires_at.is_(None) | (UserEmailToken.expires_at > now)
        )
    return UserEmailToken.status == status

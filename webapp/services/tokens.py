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
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

import requests
from flask import current_app
from sqlalchemy import Table, bindparam, insert, select, update
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
# Built once for the refresh hot path: plain Core, no ORM flush and no RETURNING.
_TOKENS = cast(Table, UserEmailToken.__table__)
_INSERT_ATTEMPT = insert(cast(Table, TokenRefreshAttempt.__table__)).inline()
_UPDATE_TOKEN = update(_TOKENS).where(_TOKENS.c.id == bindparam("row_id"))


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
    token: UserEmailToken
    refreshed: bool  # False: someone else refreshed it while we waited


def _token_lock(token_id: int) -> Any:
    """The per-token lock every refresh and revoke takes, waiting up to its timeout."""
    timeout = current_app.config["REFRESH_LOCK_SECONDS"]
    return redis_store.locked(f"mailkey:lock:refresh:{token_id}", timeout, wait=timeout + 5)


def _busy() -> ProviderUnavailable:
    return ProviderUnavailable(
        "another refresh of this token is still running", headers={"Retry-After": "5"}
    )


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

    Raises NeedsReauth / TokenRevoked (409), ProviderConfigError (502) or
    ProviderUnavailable (503, with the provider's Retry-After).
    """
    requested_at = requested_at or utcnow()
    with _token_lock(token_id) as acquired:
        if not acquired:
            raise _busy()
        db.session.expire_all()
        token = db.session.get(UserEmailToken, token_id, populate_existing=True)
        if token is None:
            raise NotFound("no such token")
        ensure_usable(token)
        if token.last_refreshed_at and token.last_refreshed_at >= requested_at:
            return RefreshResult(token, refreshed=False)
        if not force and token.expires_at and token.expires_at - utcnow() > ahead:
            return RefreshResult(token, refreshed=False)
        refreshed_token, refreshed = _refresh_locked(token, trigger)
        return RefreshResult(refreshed_token, refreshed=refreshed)


def _refresh_locked(token: UserEmailToken, trigger: str) -> tuple[UserEmailToken, bool]:
    provider = provider_for(token.provider)
    if not provider.configured:
        # Never send a user's refresh token to a provider without Mailkey's client id;
        # the token is left as it is and nothing is counted against it.
        log.error(
            "provider_not_configured",
            extra={
                "event": "provider_not_configured",
                "token_id": token.id,
                "provider": provider.name,
            },
        )
        raise ProviderConfigError(
            f"provider {provider.name} is not configured: set {provider.client_id_var}",
            reason="provider_not_configured",
        )
    try:
        refresh_secret = read_refresh_token(token)
    except DecryptionError:
        raise _unusable_ciphertext(token) from None
    if refresh_secret is None:
        expired = token.expires_at is not None and token.expires_at <= utcnow()
        if expired:
            mark_needs_reauth(token, "no_refresh_token")
            db.session.commit()
        raise NeedsReauth(
            "the provider issued no refresh token; the mailbox must be reconnected",
            reason="no_refresh_token",
        )

    sent_ciphertext = token.refresh_token_encrypted
    started_at = utcnow()
    clock = time.perf_counter()
    failure: ProviderFailure | None = None
    stale = False
    answer: dict[str, Any] = {}
    try:
        grant = {"grant_type": "refresh_token", "refresh_token": refresh_secret}
        if provider.refresh_with_scope:
            grant["scope"] = " ".join(provider.scopes)
        answer = token_request(
            provider,
            grant,
            timeout=current_app.config["PROVIDER_TIMEOUT_SECONDS"],
        )
    except ProviderFailure as exc:
        failure = exc
    finished_at = utcnow()
    elapsed = time.perf_counter() - clock
    attempt: dict[str, Any] = {
        "token_id": token.id,
        "organization_id": token.organization_id,
        "provider": token.provider,
        "started_at": started_at,
        "finished_at": finished_at,
        "duration_ms": int(elapsed * 1000),
        "trigger": trigger,
    }
    # Values for the metrics and the log, read before the commit expires the objects.
    token_id, provider_name = token.id, token.provider
    changes: dict[str, Any] = {}
    scope_lost = False
    if failure is None:
        # Nothing but encryption between the provider's answer and this commit.
        changes = token_response_values(token, answer, finished_at)
        failure = _mail_scope_lost(provider, changes.get("scopes"))
        if failure is not None:
            # The grant no longer covers mail. The new tokens are kept (a rotated
            # refresh token has replaced the old one) but the mailbox must be connected
            # again: the callback would have refused such a grant.
            scope_lost = True
            _set_columns(token, changes)
            changes = {}
    if failure is None:
        changes.update(
            last_refreshed_at=finished_at,
            refresh_failure_count=0,
            last_refresh_error=None,
            status_reason=None,
        )
        outcome, error_code = "success", None
        attempt["http_status"] = 200
    else:
        outcome, error_code = failure.outcome, failure.error_code[:100]
        attempt["http_status"] = failure.http_status
        # A refusal of a refresh token that was replaced while this attempt ran (by a
        # process that took the lock after ours expired) says nothing about the grant,
        # which lives on under the newer token: leave the row to that process.
        stale = (
            failure.kind == "permanent"
            and not scope_lost
            and _rotated_meanwhile(token, sent_ciphertext, refresh_secret)
        )
        if not stale:
            token.refresh_failure_count += 1
            # Some servers echo what they were sent in error_description.
            token.last_refresh_error = _scrub(
                failure.summary, refresh_secret, provider.client_secret or ""
            )
            if failure.kind == "permanent":
                mark_needs_reauth(token, failure.error_code)
    attempt["outcome"], attempt["error_code"] = outcome, error_code
    db.session.execute(_INSERT_ATTEMPT, attempt)
    if changes:  # the failure branches changed the ORM row instead, flushed by the commit
        db.session.execute(_UPDATE_TOKEN, {"row_id": token_id, **changes})
        db.session.expire(token)  # its loaded values are stale now
    db.session.commit()
    TOKEN_REFRESH_TOTAL.labels(provider_name, outcome).inc()
    TOKEN_REFRESH_SECONDS.labels(provider_name).observe(elapsed)
    log.info(
        "token_refresh",
        extra={
            "event": "token_refresh",
            "token_id": token_id,
            "provider": provider_name,
            "outcome": outcome,
            "error_code": error_code,
            "trigger": trigger,
        },
    )
    if failure is not None and stale:
        log.warning(
            "refresh_token_replaced_meanwhile",
            extra={"event": "refresh_token_replaced_meanwhile", "token_id": token_id},
        )
        db.session.refresh(token)
        return token, False
    if failure is not None:
        raise _api_error(failure)
    return token, True


def _mail_scope_lost(provider: Provider, scopes: str | None) -> ProviderFailure | None:
    """A refresh answer whose `scope` lacks a mail scope (no `scope`: unchanged)."""
    missing = provider.missing_mail_scopes(scopes.split()) if scopes else None
    if not missing:
        return None
    return ProviderFailure(
        "permanent", "mail_scope_missing", 200, None, f"not granted: {' '.join(missing)}"
    )


def _rotated_meanwhile(token: UserEmailToken, sent_ciphertext: str | None, sent: str) -> bool:
    """Whether the stored refresh token is no longer the one this attempt sent. The
    plaintexts are compared: `flask keys rotate` changes the ciphertext alone."""
    stored = db.session.execute(
        select(UserEmailToken.refresh_token_encrypted).where(UserEmailToken.id == token.id)
    ).scalar_one_or_none()
    if stored is None or stored == sent_ciphertext:
        return False
    try:
        current = decrypt_aes_gcm(stored, "oauth_refresh", _aad(token, REFRESH_COLUMN))
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

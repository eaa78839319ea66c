"""Talking to token endpoints, and classifying what they answer.

Classification reads the raw HTTP response (status, `error`,
`error_description`, `Retry-After`): DESIGN.md's error table, as data.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from typing import Any, Literal

import requests

from webapp.providers import Provider

log = logging.getLogger("mailkey.provider")

FailureKind = Literal["permanent", "configuration", "transient"]

# The user's grant is dead: needs_reauth, account paused, no retry.
PERMANENT_ERRORS = frozenset(
    {"invalid_grant", "invalid_rapt", "interaction_required", "consent_required"}
)
# Mailkey's own client or configuration is wrong: the operator must act.
CONFIG_ERRORS = frozenset(
    {"invalid_client", "unauthorized_client", "unsupported_grant_type", "invalid_scope"}
)
TRANSIENT_ERRORS = frozenset({"temporarily_unavailable", "server_error"})
AADSTS_CLASSES: dict[str, FailureKind] = {
    "AADSTS50173": "permanent",
    "AADSTS70043": "permanent",
    "AADSTS700082": "permanent",
    "AADSTS65001": "permanent",
    "AADSTS7000215": "configuration",
    "AADSTS7000222": "configuration",
    "AADSTS700016": "configuration",
    "AADSTS900144": "configuration",
}
AADSTS = re.compile(r"\bAADSTS\d+\b")
OUTCOME_OF: dict[FailureKind, str] = {
    "permanent": "permanent_error",
    "configuration": "config_error",
    "transient": "transient_error",
}


@dataclass
class ProviderFailure(Exception):
    kind: FailureKind
    error_code: str
    http_status: int | None = None
    retry_after: float | None = None
    description: str | None = None

    def __str__(self) -> str:
        status = f" (HTTP {self.http_status})" if self.http_status else ""
        return f"{self.kind} provider error {self.error_code}{status}"

    @property
    def outcome(self) -> str:
        return OUTCOME_OF[self.kind]

    @property
    def summary(self) -> str:
        """Short, secret-free text for last_refresh_error and API messages."""
        text = self.error_code
        if self.description:
            text += f": {self.description[:200]}"
        return text


def _retry_after(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def classify(response: requests.Response) -> ProviderFailure | None:
    """None for a usable token answer; otherwise the failure and its class."""
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return ProviderFailure("transient", "invalid_response", status, _retry_after(response))
    error = body.get("error")
    description = body.get("error_description")
    description = description if isinstance(description, str) else None
    if status < 400 and not error:
        if not isinstance(body.get("access_token"), str):
            return ProviderFailure("transient", "invalid_response", status)
        return None
    code = error if isinstance(error, str) else f"http_{status}"
    retry_after = _retry_after(response)
    if status >= 500 or status == 429 or code in TRANSIENT_ERRORS:
        return ProviderFailure("transient", code, status, retry_after, description)
    aadsts = AADSTS.search(description or "")
    if aadsts and aadsts.group(0) in AADSTS_CLASSES:
        return ProviderFailure(AADSTS_CLASSES[aadsts.group(0)], code, status, None, description)
    if code in PERMANENT_ERRORS:
        return ProviderFailure("permanent", code, status, None, description)
    # invalid_client and friends, and any other 4xx Mailkey cannot fix by retrying.
    return ProviderFailure("configuration", code, status, None, description)


def token_request(
    provider: Provider,
    data: dict[str, str],
    timeout: float,
    session: requests.Session | None = None,
) -> dict[str, Any]:
    """POST to the token endpoint with the provider's client authentication."""
    form = dict(data)
    auth: tuple[str, str] | None = None
    if provider.token_auth_method == "client_secret_basic":  # noqa: S105
        auth = (provider.client_id or "", provider.client_secret or "")
    else:
        form["client_id"] = provider.client_id or ""
        if provider.client_secret:
            form["client_secret"] = provider.client_secret
    http = session or _session()
    try:
        response = http.post(
            provider.token_url,
            data=form,
            auth=auth,
            timeout=timeout,
            headers={"Accept": "application/json"},
        )
    except requests.Timeout as exc:
        raise ProviderFailure("transient", "timeout") from exc
    except requests.RequestException as exc:
        raise ProviderFailure("transient", "connection_error") from exc
    failure = classify(response)
    if failure is not None:
        raise failure
    return response.json()


_local = threading.local()


def _session() -> requests.Session:
    """One pooled HTTP session per thread (a requests.Session is not shared across threads)."""
    session = getattr(_local, "session", None)
    if session is None:
        session = _local.session = requests.Session()
    return session

"""Talking to token endpoints, and classifying what they answer.

Classification reads the raw HTTP response (status, `error`,
`error_description`, `Retry-After`): DESIGN.md's error table, as data.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from http.cookiejar import DefaultCookiePolicy
from typing import Any, Literal
from urllib.parse import parse_qsl, quote

import requests
from flask import current_app, has_app_context

from webapp.config import REQUESTS_VARS, is_proxy_variable
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
FORM_BODY = re.compile(r"[^\s<>\"']+=[^\s<>\"']*")
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
    """Delay-seconds or an HTTP-date (RFC 9110 10.2.3)."""
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def parse_body(response: requests.Response) -> Any:
    """The JSON body; else a form-encoded answer (`error=invalid_grant&...`, as some
    servers send, whatever their Content-Type says); None for anything else."""
    try:
        return response.json()
    except ValueError:
        pass
    text = response.text.strip()
    if not FORM_BODY.fullmatch(text):  # an HTML page is garbage, whatever links it holds
        return None
    form = dict(parse_qsl(text))
    return form if "error" in form or "access_token" in form else None


def parse_scope(value: Any) -> list[str] | None:
    """A `scope` as servers send it: space separated (RFC 6749 3.3), comma separated, or
    a JSON list. None when absent or empty."""
    if isinstance(value, list):
        scopes = [item for item in value if isinstance(item, str) and item]
    elif isinstance(value, str):
        scopes = value.replace(",", " ").split()
    else:
        return None
    return scopes or None


def client_auth(provider: Provider, form: dict[str, str]) -> tuple[str, str] | None:
    """Add the client's credentials to `form` (client_secret_post) or return the Basic
    credentials, form-encoded first as RFC 6749 2.3.1 requires (client_secret_basic)."""
    if provider.token_auth_method == "client_secret_basic":  # noqa: S105
        return quote(provider.client_id or "", safe=""), quote(
            provider.client_secret or "", safe=""
        )
    form["client_id"] = provider.client_id or ""
    if provider.client_secret:
        form["client_secret"] = provider.client_secret
    return None


def classify(response: requests.Response, body: Any) -> ProviderFailure | None:
    """None for a usable token answer (`body` as parse_body read it); otherwise the
    failure and its class."""
    status = response.status_code
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


def refused_code(failure: ProviderFailure) -> bool:
    """At the code exchange: the server refused the code or the verifier, and connecting
    again is the user's fix. Google and Microsoft say invalid_grant; other servers
    answer 400 with invalid_request and the like. A refused client (CONFIG_ERRORS, a
    401/403/404, an AADSTS code such as 900144) stays the operator's."""
    if failure.kind == "permanent":
        return True
    return (
        failure.kind == "configuration"
        and failure.http_status == 400
        and failure.error_code not in CONFIG_ERRORS
        and not AADSTS.search(failure.description or "")
    )


def token_request(
    provider: Provider,
    data: dict[str, str],
    timeout: float,
    session: requests.Session | None = None,
) -> dict[str, Any]:
    """POST to the token endpoint with the provider's client authentication."""
    form = dict(data)
    auth = client_auth(provider, form)
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
    body = parse_body(response)
    failure = classify(response, body)
    if failure is not None:
        raise failure
    return body


_local = threading.local()


def _session() -> requests.Session:
    """One pooled HTTP session per thread (a requests.Session is not shared across threads).
    It keeps no cookies: token endpoints set some (load balancers, Microsoft's `fpc`), and
    one user's refresh must not carry them into another's."""
    session = getattr(_local, "session", None)
    if session is None:
        environ = current_app.config["REQUESTS_ENV"] if has_app_context() else {}
        session = _local.session = new_session(environ)
    return session


def new_session(environ: Mapping[str, str]) -> requests.Session:
    """A session that keeps no cookies. With no proxy configured in the environment it
    does not read the environment again on every request (requests scans all of
    os.environ for proxies twice per call, ~0.8 ms of a ~6 ms refresh); the CA bundle
    variables requests would read then are applied here, once. With a proxy, requests
    keeps reading the environment, so NO_PROXY works as it documents."""
    session = requests.Session()
    session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))
    if not any(is_proxy_variable(key) and value for key, value in environ.items()):
        session.trust_env = False  # also skips ~/.netrc: no credentials from elsewhere
        session.verify = next((environ[v] for v in REQUESTS_VARS if environ.get(v)), True)
    return session

"""Structured logging with redaction.

Redaction happens in the formatter, on the final text (message, arguments,
exception and extra fields alike), so nothing formatted by any handler that
uses these formatters can carry a token, code, state, key or password. The
same formatters serve the app, Celery and gunicorn (see gunicorn.conf.py).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

REDACTED = "[REDACTED]"
# Names of values to redact (not secrets themselves).
SECRET_NAMES = "|".join(  # noqa: S105
    [
        "code",
        "state",
        "access_token",
        "refresh_token",
        "id_token",
        "token",
        "client_secret",
        "password",
        "secret",
        "code_verifier",
        "assertion",
        "api_key",
        "key",
        "auth",
        "authorization",
        "metrics_token",
    ]
)
_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    # Authorization headers and bearer strings, incl. XOAUTH2 "auth=Bearer ..."
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9\-._~+/=]+"), rf"\1 {REDACTED}"),
    # query strings and form bodies: code=..., state=..., refresh_token=...
    (
        re.compile(rf"(?i)(?<![A-Za-z0-9_])({SECRET_NAMES})=([^&\s\"',;)\x01]+)"),
        rf"\1={REDACTED}",
    ),
    # JSON / dict reprs: "access_token": "..." or 'password': '...'
    (
        re.compile(rf"(?i)([\"']?(?:[a-z_]*(?:{SECRET_NAMES}))[\"']?\s*[:=]\s*)([\"'])(.*?)\2"),
        rf"\1\2{REDACTED}\2",
    ),
    # Passwords in connection URLs: postgresql://user:password@host, redis://:password@host
    (re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://[^:/@\s]*:)[^@\s/]+@"), rf"\1{REDACTED}@"),
    # Mailkey ciphertexts (v1:<fp>:<payload>)
    (re.compile(r"\bv1:([0-9a-f]{8}):[A-Za-z0-9\-_=]{16,}"), rf"v1:\1:{REDACTED}"),
    # Key-like values in NAME=value lines
    (
        re.compile(r"(ENCRYPTION_KEY_[A-Z_]+|API_JWT_SECRET|FLOWER_BASIC_AUTH)=\S+"),
        rf"\1={REDACTED}",
    ),
]
STANDARD_ATTRS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def redact(text: str) -> str:
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class ContextFilter(logging.Filter):
    """Adds request_id and user_id from the Flask request, when there is one."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            from flask import g, has_request_context, request

            if has_request_context():
                record.request_id = getattr(g, "request_id", None)
                principal = request.environ.get("mailkey.principal")
                record.user_id = getattr(principal, "user_id", None)
        except Exception:  # noqa: S110 - logging must never fail
            pass
        return True


class RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = _extras(record)
        if extras:
            line += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        return redact(line)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat().replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "event": getattr(record, "event", None) or record.getMessage(),
            "message": record.getMessage(),
        }
        payload.update(_extras(record))
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        # Texts are redacted before json.dumps escapes their quotes: a JSON body quoted in
        # a message would otherwise reach the line as {\"access_token\": \"...\"}.
        payload = {k: redact(v) if isinstance(v, str) else v for k, v in payload.items()}
        return redact(json.dumps(payload, default=str))


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {
        key: value
        for key, value in vars(record).items()
        if key not in STANDARD_ATTRS and key != "event" and value is not None
    }


def make_formatter(fmt: str) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter()
    return RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Route the root logger through one redacting handler on stderr."""
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(make_formatter(fmt))
    handler.addFilter(ContextFilter())
    for existing in list(root.handlers):
        if getattr(existing, "_mailkey", False):
            root.removeHandler(existing)
    handler._mailkey = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    # imapclient at DEBUG logs the IMAP wire traffic: whole messages, into the logs.
    for noisy in ("urllib3", "werkzeug", "authlib", "alembic.runtime.plugins", "imapclient"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))

"""No token, code, state, key, password or Authorization header in any log line."""

from __future__ import annotations

import io
import json
import logging
import sys

import pytest

from tests.support.flows import authorize, start_login
from webapp.logs import JsonFormatter, RedactingFormatter, configure_logging, redact
from webapp.services import tokens as token_service


@pytest.fixture
def captured_logs():
    """Every log record of the process, formatted by both production formatters."""
    stream = io.StringIO()
    handlers = []
    for formatter in (RedactingFormatter("%(name)s %(message)s"), JsonFormatter()):
        handler = logging.StreamHandler(stream)
        handler.setFormatter(formatter)
        handler.setLevel(logging.DEBUG)
        handlers.append(handler)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.DEBUG)
    for handler in handlers:
        root.addHandler(handler)
    yield stream
    for handler in handlers:
        root.removeHandler(handler)
    root.setLevel(level)


def test_oauth_flow_logs_no_secret(client, auth_headers, oauth_provider, captured_logs):
    headers = auth_headers()
    login = start_login(client, headers)
    params = authorize(login["authorization_url"])
    response = client.get("/api/v1/oauth/callback/google", query_string=params, headers=headers)
    assert response.status_code == 201
    token_id = response.json["id"]
    client.post(f"/api/v1/oauth/tokens/{token_id}/refresh", headers=headers)
    oauth_provider.fail_token_with("invalid_client", status=401)
    client.post(f"/api/v1/oauth/tokens/{token_id}/refresh", headers=headers)
    from webapp.extensions import db
    from webapp.models import UserEmailToken

    row = db.session.get(UserEmailToken, token_id)
    secrets = [
        params["code"],
        params["state"],
        token_service.read_access_token(row),
        token_service.read_refresh_token(row),
        oauth_provider.client_secret,
        headers["Authorization"].split()[1],
    ]
    # log the worst a careless line could: the request URL, headers and the token answer
    logging.getLogger("mailkey.test").warning(
        "careless GET /api/v1/oauth/callback/google?code=%s&state=%s Authorization: Bearer %s %s",
        params["code"],
        params["state"],
        secrets[5],
        {"access_token": secrets[2], "refresh_token": secrets[3], "client_secret": secrets[4]},
    )
    output = captured_logs.getvalue()
    assert "token_refresh" in output and "careless" in output
    for secret in secrets:
        assert secret not in output


@pytest.mark.parametrize(
    "line",
    [
        '127.0.0.1 "GET /api/v1/oauth/callback/google?code=4/0AbCdEf&state=xyz123 HTTP/1.1" 201',
        "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30.sig",
        "{'refresh_token': 'rt-secret-value', 'password': 'hunter2'}",
        '{"access_token": "at-secret-value", "id_token": "eyJ.x.y"}',
        "grant_type=refresh_token&refresh_token=rt-secret-value&client_secret=cs-value",
        "user=a@b.c\x01auth=Bearer at-secret-value\x01\x01",
        "ENCRYPTION_KEY_PII=c2VjcmV0LWtleS1tYXRlcmlhbA==",
        "stored v1:0123abcd:QUJDREVGR0hJSktMTU5PUFFSU1RVVldY",
    ],
)
def test_redaction_patterns(line):
    redacted = redact(line)
    for secret in (
        "4/0AbCdEf",
        "xyz123",
        "eyJhbGciOiJIUzI1NiJ9",
        "rt-secret-value",
        "hunter2",
        "at-secret-value",
        "cs-value",
        "c2VjcmV0LWtleS1tYXRlcmlhbA",
        "QUJDREVGR0hJSktMTU5PUFFSU1RVVldY",
    ):
        assert secret not in redacted


@pytest.fixture
def gunicorn_logging(monkeypatch):
    """Apply gunicorn.conf.py's logconfig_dict as gunicorn does (merged into its own
    defaults, gunicorn/glogging.py), then the app's configure_logging; restore after."""
    import logging.config
    import runpy

    from gunicorn.glogging import CONFIG_DEFAULTS

    root = logging.getLogger()
    root_handlers, root_level = root.handlers[:], root.level
    names = ("gunicorn.access", "gunicorn.error", "mailkey.interop")
    kept = {name: logging.getLogger(name).handlers[:] for name in names}

    def apply(log_format: str) -> io.StringIO:
        monkeypatch.setenv("LOG_FORMAT", log_format)
        config = dict(CONFIG_DEFAULTS)
        config.update(runpy.run_path("gunicorn.conf.py")["logconfig_dict"])
        logging.config.dictConfig(config)
        configure_logging("INFO", log_format)
        stream = io.StringIO()
        for handler in [*root.handlers, *logging.getLogger("gunicorn.access").handlers]:
            handler.setStream(stream)  # type: ignore[attr-defined]
        return stream

    yield apply
    root.handlers[:] = root_handlers
    root.setLevel(root_level)
    for name, handlers in kept.items():
        logging.getLogger(name).handlers[:] = handlers


def _access_line(stream: io.StringIO) -> str:
    logging.getLogger("gunicorn.access").info(
        '%(h)s "%(r)s" %(s)s',
        {
            "h": "127.0.0.1",
            "r": "GET /api/v1/oauth/callback/google?code=abc&state=def HTTP/1.1",
            "s": "201",
        },
    )
    return stream.getvalue()


def test_gunicorn_access_log_uses_the_redacting_formatter(gunicorn_logging):
    line = _access_line(gunicorn_logging("text"))
    assert "code=[REDACTED]" in line and "state=[REDACTED]" in line
    assert "abc" not in line and "def" not in line


def test_under_gunicorn_each_app_line_is_written_once_in_the_chosen_format(gunicorn_logging):
    """gunicorn's defaults give the root logger a plain handler; every app line was
    written twice, once unredacted by format and not JSON (found under gunicorn)."""
    stream = gunicorn_logging("json")
    logging.getLogger("mailkey.interop").info("connected", extra={"event": "connected"})
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1, lines
    assert json.loads(lines[0])["event"] == "connected"
    access = json.loads(_access_line(stream).splitlines()[-1])
    assert "code=[REDACTED]" in access["message"] and "abc" not in access["message"]


def test_json_formatter_redacts_json_text_in_messages_and_exceptions():
    """json.dumps escapes the quotes of a JSON body inside the message (a provider's
    answer, an exception quoting one): the escaped form is redacted too."""
    body = '{"access_token": "at-secret-value", "refresh_token": "rt-secret-value"}'
    try:
        raise ValueError(f"unexpected token answer: {body}")
    except ValueError:
        record = logging.getLogger("mailkey.test").makeRecord(
            "mailkey.test", logging.ERROR, __file__, 1, "provider said %s", (body,), sys.exc_info()
        )
    line = JsonFormatter().format(record)
    assert "at-secret-value" not in line and "rt-secret-value" not in line
    assert json.loads(line)["message"].startswith("provider said")

"""No token, code, state, key, password or Authorization header in any log line."""

from __future__ import annotations

import io
import json
import logging
import sys

import pytest

from tests.support.flows import authorize, start_login
from webapp.logs import JsonFormatter, RedactingFormatter, redact
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


def test_gunicorn_access_log_uses_the_redacting_formatter():
    import logging.config
    import runpy

    config = runpy.run_path("gunicorn.conf.py")["logconfig_dict"]
    logging.config.dictConfig(config)
    access = logging.getLogger("gunicorn.access")
    stream = io.StringIO()
    handler = access.handlers[0]
    handler.setStream(stream)
    access.info(
        '%(h)s "%(r)s" %(s)s',
        {
            "h": "127.0.0.1",
            "r": "GET /api/v1/oauth/callback/google?code=abc&state=def HTTP/1.1",
            "s": "201",
        },
    )
    line = stream.getvalue()
    assert "code=[REDACTED]" in line and "state=[REDACTED]" in line
    assert "abc" not in line and "def" not in line


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

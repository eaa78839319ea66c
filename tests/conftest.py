"""Test fixtures: a real PostgreSQL database, real Redis, a local OAuth provider.

A service that cannot be reached skips the tests that need it, loudly, on a
developer's machine, and fails them when CI=true.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient

from tests.support.database import drop_database
from tests.support.mailserver import DovecotServer, SmtpServer
from tests.support.oauth_provider import OAuthProvider
from webapp import create_app
from webapp.auth import issue_token
from webapp.config import Settings
from webapp.crypto import generate_keys

TEST_DATABASE_URL = os.environ.get(
    "TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/mailkey_test"
)
TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
JWT_SECRET = "test-jwt-secret-" + "x" * 56
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
TABLES = (
    "mail_sends",
    "mail_messages",
    "mail_folders",
    "sync_runs",
    "mail_accounts",
    "token_refresh_attempts",
    "user_email_tokens",
)


def missing_service(reason: str) -> None:
    """Skip loudly on a developer machine; fail in CI, where every service must run."""
    message = f"SERVICE MISSING: {reason}"
    if IN_CI:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _ensure_database(url: str) -> None:
    database = sa.engine.make_url(url).database or ""
    if not database.endswith("_test"):
        pytest.exit(f"refusing to use database {database!r}: its name must end in _test")
    drop_database(url, create=True)


@pytest.fixture(scope="session")
def database_url() -> str:
    try:
        _ensure_database(TEST_DATABASE_URL)
    except sa.exc.OperationalError as exc:
        missing_service(f"PostgreSQL at {TEST_DATABASE_URL} ({exc.__class__.__name__})")
    return TEST_DATABASE_URL


@pytest.fixture(scope="session")
def redis_url() -> str:
    try:
        redis.Redis.from_url(TEST_REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        missing_service(f"Redis at {TEST_REDIS_URL} ({exc.__class__.__name__})")
    return TEST_REDIS_URL


@pytest.fixture(scope="session")
def oauth_provider() -> Iterator[OAuthProvider]:
    with OAuthProvider(client_secret="test-client-secret-" + "s" * 16) as provider:
        yield provider


PASSWORD_USER = "pw-user@example.com"
PASSWORD = "pw-user-secret"


@dataclass
class MailServers:
    imap: DovecotServer
    smtp: SmtpServer


@pytest.fixture(scope="session")
def mail_servers(
    oauth_provider: OAuthProvider, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MailServers | None]:
    """Dovecot (IMAP, XOAUTH2 checked against the local provider) and an SMTP server."""
    if not (os.path.exists("/usr/sbin/dovecot") and shutil.which("doveadm")):
        yield None
        return
    users = {PASSWORD_USER: PASSWORD}
    with DovecotServer(
        oauth_provider.url("introspect"),
        password_users=users,
        workdir=tmp_path_factory.mktemp("dovecot"),
    ) as imap:
        with SmtpServer(
            oauth_provider.url("introspect"),
            password_users=users,
            security="starttls",
            tls_cert=imap.cert_file,
            tls_key=imap.key_file,
            ca_file=imap.ca_file,
        ) as smtp:
            yield MailServers(imap, smtp)


@pytest.fixture
def mail(mail_servers: MailServers | None) -> MailServers:
    if mail_servers is None:
        missing_service("Dovecot (apt-get install dovecot-imapd)")
    assert mail_servers is not None
    mail_servers.smtp.clear()
    return mail_servers


@pytest.fixture(scope="session")
def encryption_keys() -> dict[str, str]:
    return generate_keys()


@pytest.fixture(scope="session")
def base_env(
    tmp_path_factory: pytest.TempPathFactory,
    database_url: str,
    redis_url: str,
    oauth_provider: OAuthProvider,
    encryption_keys: dict[str, str],
    mail_servers: MailServers | None,
) -> dict[str, str]:
    instance = tmp_path_factory.mktemp("instance")
    env = {
        "MAILKEY_ENV": "test",
        "MAILKEY_INSTANCE_PATH": str(instance),
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "API_JWT_SECRET": JWT_SECRET,
        "FLOWER_BASIC_AUTH": "test:test",
        "LOG_LEVEL": "INFO",
        "OAUTH_REDIRECT_URI": "http://localhost:3000/auth/callback/{provider}",
        **encryption_keys,
    }
    for prefix in ("GOOGLE", "MICROSOFT", "YAHOO"):
        env.update(oauth_provider.env(prefix))
    if mail_servers is not None:
        env["MAIL_CA_FILE"] = str(mail_servers.imap.ca_file)
        env["MAIL_TIMEOUT_SECONDS"] = "10"
        test_ports = (
            mail_servers.imap.imaps_port,
            mail_servers.imap.imap_port,
            mail_servers.smtp.port,
        )
        env["MAIL_ALLOWED_PORTS"] = ",".join(map(str, (993, 143, 465, 587, 25, *test_ports)))
        for prefix in ("GOOGLE", "MICROSOFT", "YAHOO"):
            env[f"{prefix}_IMAP_HOST"] = mail_servers.imap.host
            env[f"{prefix}_IMAP_PORT"] = str(mail_servers.imap.imaps_port)
            env[f"{prefix}_SMTP_HOST"] = mail_servers.smtp.host
            env[f"{prefix}_SMTP_PORT"] = str(mail_servers.smtp.port)
            env[f"{prefix}_SMTP_SECURITY"] = "starttls"
    env["YAHOO_REVOKE_URL"] = ""  # Yahoo: no revocation endpoint unless configured
    env["MICROSOFT_USERINFO_URL"] = ""
    env["MICROSOFT_REVOKE_URL"] = ""  # as in production: Microsoft has no revocation endpoint
    return env


def make_app(env: dict[str, str], **overrides: str) -> Flask:
    app = create_app(settings=Settings.from_env({**env, **overrides}))
    app.config["TESTING"] = True
    return app


@pytest.fixture(scope="session")
def migrated_app(base_env: dict[str, str]) -> Flask:
    from flask_migrate import upgrade

    app = make_app(base_env)
    with app.app_context():
        upgrade(directory=str(Path(__file__).parent.parent / "migrations"))
    return app


@pytest.fixture
def sqlite_app(base_env: dict[str, str], tmp_path: Path, migrated_app: Flask) -> Iterator[Flask]:
    """A migrated app on SQLite (`make run`'s default), in its app context. Creating an
    app makes its Celery app the default and current one; the session app's is made so
    again after."""
    from flask_migrate import upgrade

    from webapp.extensions import db

    app = make_app(base_env, DATABASE_URL=f"sqlite:///{tmp_path / 'mailkey.db'}")
    try:
        with app.app_context():
            upgrade(directory=str(Path(__file__).parent.parent / "migrations"))
            yield app
            db.session.remove()
            db.engine.dispose()
    finally:  # tasks called directly run in the current app's context: make it ours again
        migrated_app.extensions["celery"].set_default()
        migrated_app.extensions["celery"].set_current()


@pytest.fixture
def app(migrated_app: Flask, oauth_provider: OAuthProvider) -> Iterator[Flask]:
    """The session app with empty tables, an empty Redis db and a fresh provider.

    Redis is emptied first, so tasks queued by an earlier test never run; rows are
    deleted rather than truncated, so a task of an earlier test still running on the
    worker cannot deadlock the cleanup, and ids are never reused, so such a task
    finds nothing of this test's to touch.
    """
    from webapp.extensions import db, redis_store

    with migrated_app.app_context():
        redis_store.client.flushdb()
        _wait_for_idle_worker()
        for table in TABLES:
            db.session.execute(sa.text(f"DELETE FROM {table}"))  # noqa: S608 - fixed names
        db.session.commit()
    oauth_provider.reset()
    with migrated_app.app_context():
        yield migrated_app
        db.session.remove()


def _wait_for_idle_worker(timeout: float = 30.0) -> None:
    """Let tasks an earlier test left on the in-process worker finish first."""
    import time

    from celery.worker import state

    deadline = time.monotonic() + timeout
    while (state.active_requests or state.reserved_requests) and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def make_token() -> Callable[..., str]:
    def make(user_id: int = 1, org_id: int = 1, *, admin: bool = False, ttl: int = 3600) -> str:
        return issue_token(JWT_SECRET, user_id, org_id, admin=admin, ttl=ttl)

    return make


@pytest.fixture
def auth_headers(make_token: Callable[..., str]) -> Callable[..., dict[str, str]]:
    def headers(user_id: int = 1, org_id: int = 1, *, admin: bool = False) -> dict[str, str]:
        return {"Authorization": f"Bearer {make_token(user_id, org_id, admin=admin)}"}

    return headers


@pytest.fixture(scope="session")
def celery_worker(migrated_app: Flask) -> Iterator[Any]:
    """A real Celery worker (threads) consuming from the test Redis."""
    from celery.contrib.testing.worker import start_worker

    celery_app = migrated_app.extensions["celery"]
    with start_worker(
        celery_app,
        pool="threads",
        concurrency=4,
        perform_ping_check=False,
        shutdown_timeout=30,
        loglevel="WARNING",
    ) as worker:
        yield worker


def random_email() -> str:
    return f"user-{secrets.token_hex(4)}@example.com"

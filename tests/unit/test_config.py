"""Settings: every problem named at start-up; production refuses unsafe defaults."""

from __future__ import annotations

import pytest

from webapp.config import ConfigError, Settings, log_format
from webapp.crypto import generate_keys

PRODUCTION = {
    "MAILKEY_ENV": "production",
    "DATABASE_URL": "postgresql://mailkey@db.internal/mailkey",
    "REDIS_URL": "redis://redis.internal:6379/0",
    "API_JWT_SECRET": "p" * 48,
    "OAUTH_REDIRECT_URI": "https://app.example.com/auth/callback",
    "GOOGLE_CLIENT_ID": "client",
    "GOOGLE_CLIENT_SECRET": "secret",
}


def test_production_names_every_missing_variable(tmp_path):
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"MAILKEY_ENV": "production", "MAILKEY_INSTANCE_PATH": str(tmp_path)})
    message = str(caught.value)
    for name in (
        "DATABASE_URL",
        "REDIS_URL",
        "API_JWT_SECRET",
        "ENCRYPTION_KEY_OAUTH_AES_GCM",
        "ENCRYPTION_KEY_PII",
        "OAUTH_REDIRECT_URI",
        "GOOGLE_CLIENT_ID",
    ):
        assert name in message
    assert not (tmp_path / "dev-secrets.env").exists()


def test_production_accepts_a_complete_configuration(tmp_path):
    settings = Settings.from_env(
        {**PRODUCTION, **generate_keys(), "MAILKEY_INSTANCE_PATH": str(tmp_path)}
    )
    assert settings.production
    assert settings.DATABASE_URL.startswith("postgresql+psycopg://")
    assert settings.LOG_FORMAT == "json"
    assert settings.TRUSTED_PROXY_COUNT == 1
    assert settings.MAIL_ALLOW_PRIVATE_HOSTS is False


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("DATABASE_URL", "sqlite:///x.db", "DATABASE_URL: SQLite"),
        ("OAUTH_REDIRECT_URI", "http://app.example.com/cb", "OAUTH_REDIRECT_URI: must be https"),
        ("GOOGLE_TOKEN_URL", "http://evil.example.com/token", "GOOGLE_TOKEN_URL: must be https"),
        ("API_JWT_SECRET", "short", "API_JWT_SECRET: must be at least 32 bytes"),
        ("ENCRYPTION_KEY_PII", "not base64 !!", "ENCRYPTION_KEY_PII"),
    ],
)
def test_production_rejects_unsafe_values(tmp_path, name, value, expected):
    from webapp import create_app

    env = {**PRODUCTION, **generate_keys(), "MAILKEY_INSTANCE_PATH": str(tmp_path), name: value}
    with pytest.raises(Exception) as caught:
        create_app(settings=Settings.from_env(env))
    assert expected in str(caught.value)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("REFRESH_SCAN_SECONDS", "soon"),
        ("MAIL_ALLOW_PRIVATE_HOSTS", "perhaps"),
        ("LOG_LEVEL", "LOUD"),
        ("GOOGLE_IMAP_PORT", "99999"),
        ("GOOGLE_SMTP_SECURITY", "tls"),
        ("REDIS_URL", "http://localhost"),
        ("MAIL_ALLOWED_PORTS", "993,imap"),
    ],
)
def test_malformed_values_fail_naming_the_variable(tmp_path, name, value):
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"MAILKEY_INSTANCE_PATH": str(tmp_path), name: value})
    assert name in str(caught.value)


def test_loopback_http_provider_urls_are_allowed_in_development(tmp_path):
    settings = Settings.from_env(
        {"MAILKEY_INSTANCE_PATH": str(tmp_path), "GOOGLE_TOKEN_URL": "http://127.0.0.1:9/token"}
    )
    assert settings.PROVIDERS["google"].token_url == "http://127.0.0.1:9/token"


def test_development_secrets_are_generated_once_with_mode_0600(tmp_path):
    first = Settings.from_env({"MAILKEY_INSTANCE_PATH": str(tmp_path)})
    secrets_file = tmp_path / "dev-secrets.env"
    assert secrets_file.stat().st_mode & 0o777 == 0o600
    second = Settings.from_env({"MAILKEY_INSTANCE_PATH": str(tmp_path)})
    assert first.API_JWT_SECRET == second.API_JWT_SECRET
    assert first.ENCRYPTION == second.ENCRYPTION
    assert first.DATABASE_URL.startswith("sqlite:///")
    assert first.EMBEDDED_REDIS and first.REDIS_URL == "redis://127.0.0.1:6390/0"


def test_provider_overrides_and_tenant(tmp_path):
    settings = Settings.from_env(
        {
            "MAILKEY_INSTANCE_PATH": str(tmp_path),
            "MICROSOFT_TENANT_ID": "contoso.onmicrosoft.com",
            "MICROSOFT_SCOPES": "openid offline_access https://outlook.office.com/IMAP.AccessAsUser.All",
            "YAHOO_REVOKE_URL": "",
            "GOOGLE_TOKEN_AUTH_METHOD": "client_secret_basic",
        }
    )
    microsoft = settings.PROVIDERS["microsoft"]
    assert "contoso.onmicrosoft.com" in microsoft.authorize_url
    assert microsoft.scopes[-1].endswith("IMAP.AccessAsUser.All")
    assert settings.PROVIDERS["yahoo"].revoke_url is None
    assert settings.PROVIDERS["google"].token_auth_method == "client_secret_basic"


@pytest.mark.parametrize(("timeout", "lock"), [(None, 60), ("10", 60), ("30", 180), ("120", 720)])
def test_refresh_lock_outlives_a_stalling_provider(tmp_path, timeout, lock):
    env = {"MAILKEY_INSTANCE_PATH": str(tmp_path)}
    if timeout:
        env["PROVIDER_TIMEOUT_SECONDS"] = timeout
    assert Settings.from_env(env).REFRESH_LOCK_SECONDS == lock


def test_requests_variables_and_gunicorns_log_format_come_from_the_config(tmp_path):
    env = {
        "MAILKEY_INSTANCE_PATH": str(tmp_path),
        "HTTPS_PROXY": "http://proxy:3128",
        "no_proxy": "localhost",
        "REQUESTS_CA_BUNDLE": "/etc/ca.pem",
        "HOME": "/root",
    }
    settings = Settings.from_env(env)
    assert settings.REQUESTS_ENV == {
        "HTTPS_PROXY": "http://proxy:3128",
        "no_proxy": "localhost",
        "REQUESTS_CA_BUNDLE": "/etc/ca.pem",
    }
    assert log_format({}) == settings.LOG_FORMAT == "text"
    assert log_format({"MAILKEY_ENV": "production"}) == "json"
    assert log_format({"LOG_FORMAT": " json "}) == "json"  # stripped, as the app reads it
    assert log_format({"LOG_FORMAT": "xml"}) == "text"  # the app refuses to start on it

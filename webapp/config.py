"""Settings: every environment variable is read and validated here, and only here.

`Settings.from_env()` collects every problem before failing, so an operator sees
all missing or malformed variables in one message, each named.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from webapp.providers import DEFAULTS, OVERRIDES, Provider

log = logging.getLogger("mailkey.config")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEV_SECRETS_FILE = "dev-secrets.env"
ENCRYPTION_VARS = (
    "ENCRYPTION_KEY_OAUTH_AES_GCM",
    "ENCRYPTION_KEY_OAUTH_REFRESH_AES_GCM",
    "ENCRYPTION_KEY_PII",
)
DEV_SECRET_VARS = ("API_JWT_SECRET", "FLOWER_BASIC_AUTH", *ENCRYPTION_VARS)
LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1"}


class ConfigError(RuntimeError):
    """Raised at start-up; the message names every offending variable."""


def is_loopback_host(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Reader:
    """Reads typed values from a mapping and records every error."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.errors: list[str] = []

    def get(self, name: str, default: str | None = None) -> str | None:
        value = self.env.get(name)
        if value is None or value.strip() == "":
            return default
        return value.strip()

    def integer(self, name: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
        raw = self.get(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            self.errors.append(f"{name}: expected an integer, got {raw!r}")
            return default
        if value < minimum or (maximum is not None and value > maximum):
            bound = f">= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
            self.errors.append(f"{name}: must be {bound}, got {value}")
        return value

    def flag(self, name: str, default: bool) -> bool:
        raw = self.get(name)
        if raw is None:
            return default
        lowered = raw.lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        self.errors.append(f"{name}: expected true or false, got {raw!r}")
        return default

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        raw = self.get(name, default) or default
        if raw not in choices:
            self.errors.append(f"{name}: must be one of {', '.join(choices)}, got {raw!r}")
            return default
        return raw

    def url(self, name: str, value: str | None, *, https_only: bool = False) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            self.errors.append(f"{name}: not an http(s) URL: {value!r}")
        elif parts.scheme == "http" and (https_only or not is_loopback_host(parts.hostname)):
            self.errors.append(f"{name}: must be https (http only for loopback hosts)")
        return value


def load_dev_secrets(instance_path: Path) -> dict[str, str]:
    path = instance_path / DEV_SECRETS_FILE
    values: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if "=" in line and not line.lstrip().startswith("#"):
                key, _, value = line.partition("=")
                values[key.strip()] = value.strip()
    return values


def ensure_dev_secrets(instance_path: Path) -> dict[str, str]:
    """Generate development secrets once into instance/dev-secrets.env (mode 0600).

    Every process and every later run reuses the file; only missing names are added.
    """
    from webapp.crypto import generate_keys

    instance_path.mkdir(parents=True, exist_ok=True)
    path = instance_path / DEV_SECRETS_FILE
    existing = load_dev_secrets(instance_path)
    missing = [name for name in DEV_SECRET_VARS if name not in existing]
    if not missing:
        return existing
    fresh = {
        "API_JWT_SECRET": secrets.token_urlsafe(48),
        "FLOWER_BASIC_AUTH": f"admin:{secrets.token_urlsafe(18)}",
        **generate_keys(),
    }
    lines = [f"{name}={fresh[name]}" for name in missing]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as handle:
        if not existing:
            handle.write("# Mailkey development secrets, generated once. Never commit.\n")
        handle.write("\n".join(lines) + "\n")
    os.chmod(path, 0o600)
    log.warning("generated development secrets %s into %s", ", ".join(missing), path)
    # Another process may have written at the same moment: the file is the truth.
    return load_dev_secrets(instance_path)


MODES = ("development", "production", "test")
LOG_FORMATS = ("text", "json")
# What requests itself reads from the environment for the calls to providers (the CA
# bundles in its order of precedence).
REQUESTS_VARS = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")


def is_proxy_variable(name: str) -> bool:
    """HTTPS_PROXY, no_proxy and the like, as urllib.request.getproxies reads them."""
    return name.lower().endswith("_proxy")


def log_format(env: Mapping[str, str]) -> str:
    """LOG_FORMAT as the app reads it, json by default in production; gunicorn.conf.py
    formats gunicorn's own lines with it (an invalid value fails the app's start)."""
    r = _Reader(env)
    production = r.choice("MAILKEY_ENV", "development", MODES) == "production"
    return r.choice("LOG_FORMAT", "json" if production else "text", LOG_FORMATS)


@dataclass(frozen=True)
class Settings:
    """Validated configuration. Upper-case fields become Flask config keys."""

    MAILKEY_ENV: str = "development"
    INSTANCE_PATH: str = str(PROJECT_ROOT / "instance")
    DATABASE_URL: str = ""
    REDIS_URL: str = ""
    EMBEDDED_REDIS: bool = True
    API_JWT_SECRET: str = field(default="", repr=False)
    LOG_LEVEL: str = "INFO"
    LOG_FORMAT: str = "text"
    MAX_CONTENT_LENGTH: int = 1_048_576
    TRUSTED_PROXY_COUNT: int = 0
    METRICS_TOKEN: str | None = field(default=None, repr=False)
    PROMETHEUS_MULTIPROC_DIR: str | None = None
    CONSOLE_ENABLED: bool = True
    OAUTH_REDIRECT_URI: str | None = None
    OAUTH_SUCCESS_REDIRECT: str | None = None
    OAUTH_STATE_TTL_SECONDS: int = 600
    PROVIDER_TIMEOUT_SECONDS: int = 10
    REFRESH_SCAN_SECONDS: int = 60
    REFRESH_AHEAD_SECONDS: int = 600
    KEEPALIVE_DAYS: int = 30
    REFRESH_LOCK_SECONDS: int = 60
    REFRESH_FANOUT_RATE: int = 200
    MAIL_CA_FILE: str | None = None
    MAIL_ALLOW_PRIVATE_HOSTS: bool = True
    MAIL_ALLOWED_PORTS: tuple[int, ...] = (993, 143, 465, 587, 25)
    MAIL_TIMEOUT_SECONDS: int = 30
    SYNC_INTERVAL_SECONDS: int = 300
    SYNC_ERROR_RETRY_SECONDS: int = 900
    SYNC_BATCH_SIZE: int = 500
    ENCRYPTION: Mapping[str, str | None] = field(default_factory=dict, repr=False)
    PROVIDERS: Mapping[str, Provider] = field(default_factory=dict, repr=False)
    # Proxy and CA bundle variables, for provider_http.new_session (may hold credentials).
    REQUESTS_ENV: Mapping[str, str] = field(default_factory=dict, repr=False)

    @property
    def production(self) -> bool:
        return self.MAILKEY_ENV == "production"

    def as_flask_config(self) -> dict[str, Any]:
        values = {k: getattr(self, k) for k in self.__dataclass_fields__ if k.isupper()}
        values["SQLALCHEMY_DATABASE_URI"] = self.DATABASE_URL
        values["SQLALCHEMY_ENGINE_OPTIONS"] = engine_options(self.DATABASE_URL)
        values["SETTINGS"] = self
        return values

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        r = _Reader(env)
        mode = r.choice("MAILKEY_ENV", "development", MODES)
        production = mode == "production"
        instance = Path(r.get("MAILKEY_INSTANCE_PATH", str(PROJECT_ROOT / "instance")) or "")

        if not production:
            missing = [name for name in DEV_SECRET_VARS if not r.get(name)]
            if missing:
                from_file = ensure_dev_secrets(instance)
                operator_oauth_key = r.get("ENCRYPTION_KEY_OAUTH_AES_GCM")
                for name in missing:
                    env[name] = from_file.get(name, "")
                if operator_oauth_key and "ENCRYPTION_KEY_OAUTH_REFRESH_AES_GCM" in missing:
                    # As in production, the refresh key falls back to an operator's OAuth key.
                    env.pop("ENCRYPTION_KEY_OAUTH_REFRESH_AES_GCM")

        database_url = r.get("DATABASE_URL")
        redis_url = r.get("REDIS_URL")
        embedded_port = r.integer("EMBEDDED_REDIS_PORT", 6390, 1, 65535)
        if production:
            required = ["DATABASE_URL", "REDIS_URL", "API_JWT_SECRET"]
            required += ["ENCRYPTION_KEY_OAUTH_AES_GCM", "ENCRYPTION_KEY_PII"]
            for name in required:
                if not r.get(name):
                    r.errors.append(f"{name}: required when MAILKEY_ENV=production")
            if database_url and database_url.startswith("sqlite"):
                r.errors.append("DATABASE_URL: SQLite is for development; use PostgreSQL")
            if not any(r.get(f"{d['env_prefix']}_CLIENT_ID") for d in DEFAULTS.values()):
                names = " or ".join(f"{d['env_prefix']}_CLIENT_ID" for d in DEFAULTS.values())
                r.errors.append(f"{names}: at least one provider must be configured")
        if database_url is None:
            instance.mkdir(parents=True, exist_ok=True)
            database_url = f"sqlite:///{instance / 'mailkey.db'}"
        elif database_url.startswith("postgresql://"):
            database_url = "postgresql+psycopg://" + database_url.removeprefix("postgresql://")
        embedded = redis_url is None
        if redis_url is None:
            redis_url = f"redis://127.0.0.1:{embedded_port}/0"
        elif not redis_url.startswith(("redis://", "rediss://", "unix://")):
            r.errors.append(
                f"REDIS_URL: expected redis://, rediss:// or unix://, got {redis_url!r}"
            )

        jwt_secret = r.get("API_JWT_SECRET", "") or ""
        if jwt_secret and len(jwt_secret.encode()) < 32:
            r.errors.append("API_JWT_SECRET: must be at least 32 bytes")

        provider_timeout = r.integer("PROVIDER_TIMEOUT_SECONDS", 10, 1, 120)
        redirect = r.url("OAUTH_REDIRECT_URI", r.get("OAUTH_REDIRECT_URI"), https_only=production)
        success = r.url(
            "OAUTH_SUCCESS_REDIRECT", r.get("OAUTH_SUCCESS_REDIRECT"), https_only=production
        )
        if production and not redirect:
            r.errors.append("OAUTH_REDIRECT_URI: required when MAILKEY_ENV=production")

        mail_ca = r.get("MAIL_CA_FILE")
        if mail_ca and not Path(mail_ca).is_file():
            r.errors.append(f"MAIL_CA_FILE: no such file {mail_ca!r}")
        ports: list[int] = []
        for part in (r.get("MAIL_ALLOWED_PORTS", "993,143,465,587,25") or "").split(","):
            try:
                ports.append(int(part))
            except ValueError:
                r.errors.append(f"MAIL_ALLOWED_PORTS: {part!r} is not a port number")

        settings = cls(
            MAILKEY_ENV=mode,
            INSTANCE_PATH=str(instance),
            DATABASE_URL=database_url,
            REDIS_URL=redis_url,
            EMBEDDED_REDIS=embedded,
            API_JWT_SECRET=jwt_secret,
            LOG_LEVEL=r.choice(
                "LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
            ),
            LOG_FORMAT=r.choice("LOG_FORMAT", "json" if production else "text", LOG_FORMATS),
            MAX_CONTENT_LENGTH=r.integer("MAX_CONTENT_LENGTH", 1_048_576, 1024),
            TRUSTED_PROXY_COUNT=r.integer("TRUSTED_PROXY_COUNT", 1 if production else 0, 0, 10),
            METRICS_TOKEN=r.get("METRICS_TOKEN"),
            PROMETHEUS_MULTIPROC_DIR=r.get("PROMETHEUS_MULTIPROC_DIR"),
            CONSOLE_ENABLED=r.flag("CONSOLE_ENABLED", True),
            OAUTH_REDIRECT_URI=redirect,
            OAUTH_SUCCESS_REDIRECT=success,
            PROVIDER_TIMEOUT_SECONDS=provider_timeout,
            # The per-token refresh lock outlives a provider answer that stalls several
            # times (the timeout applies to each read), so two refreshes never overlap.
            REFRESH_LOCK_SECONDS=max(60, 6 * provider_timeout),
            REFRESH_SCAN_SECONDS=r.integer("REFRESH_SCAN_SECONDS", 60, 5),
            REFRESH_AHEAD_SECONDS=r.integer("REFRESH_AHEAD_SECONDS", 600, 0),
            KEEPALIVE_DAYS=r.integer("KEEPALIVE_DAYS", 30, 1),
            REFRESH_FANOUT_RATE=r.integer("REFRESH_FANOUT_RATE", 200, 1),
            MAIL_CA_FILE=mail_ca,
            MAIL_ALLOW_PRIVATE_HOSTS=r.flag("MAIL_ALLOW_PRIVATE_HOSTS", not production),
            MAIL_ALLOWED_PORTS=tuple(ports),
            MAIL_TIMEOUT_SECONDS=r.integer("MAIL_TIMEOUT_SECONDS", 30, 1, 600),
            SYNC_INTERVAL_SECONDS=r.integer("SYNC_INTERVAL_SECONDS", 300, 10),
            SYNC_ERROR_RETRY_SECONDS=r.integer("SYNC_ERROR_RETRY_SECONDS", 900, 10),
            SYNC_BATCH_SIZE=r.integer("SYNC_BATCH_SIZE", 500, 1, 5000),
            ENCRYPTION=_encryption_values(r),
            PROVIDERS=_load_providers(r, production),
            REQUESTS_ENV={
                key: value
                for key, value in env.items()
                if is_proxy_variable(key) or key in REQUESTS_VARS
            },
        )
        if r.errors:
            raise ConfigError("invalid configuration:\n  " + "\n  ".join(r.errors))
        return settings


def _encryption_values(r: _Reader) -> dict[str, str | None]:
    names = [*ENCRYPTION_VARS, *(f"{name}_PREVIOUS" for name in ENCRYPTION_VARS)]
    return {name: r.get(name) for name in names}


def _load_providers(r: _Reader, production: bool) -> dict[str, Provider]:
    tenant = r.get("MICROSOFT_TENANT_ID", "common") or "common"
    providers: dict[str, Provider] = {}
    for name, defaults in DEFAULTS.items():
        values: dict[str, Any] = {"name": name, **defaults}
        prefix = defaults["env_prefix"]
        for suffix, (attr, kind) in OVERRIDES.items():
            var = f"{prefix}_{suffix}"
            if var not in r.env:
                continue
            raw = r.env[var].strip()
            if kind == "url":
                values[attr] = r.url(var, raw) if raw else values[attr]
            elif kind == "url_or_empty":
                values[attr] = r.url(var, raw) if raw else None
            elif kind == "scopes":
                values[attr] = tuple(raw.split()) if raw else values[attr]
            elif kind == "port":
                values[attr] = r.integer(var, values[attr], 1, 65535)
            elif kind == "security":
                values[attr] = r.choice(var, values[attr], ("ssl", "starttls"))
            elif kind == "auth_method":
                values[attr] = r.choice(
                    var, "client_secret_post", ("client_secret_post", "client_secret_basic")
                )
            else:
                values[attr] = raw or values.get(attr)
        for attr in ("authorize_url", "token_url"):
            values[attr] = values[attr].replace("{tenant}", tenant)
        provider = Provider(**values)
        if provider.client_id and not provider.client_secret and production:
            r.errors.append(f"{prefix}_CLIENT_SECRET: required when {prefix}_CLIENT_ID is set")
        providers[name] = provider
    return providers


def engine_options(url: str) -> dict[str, Any]:
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 30, "check_same_thread": False}}
    # Connections are pinged on checkout after idling (webapp/extensions.py), not always.
    return {"pool_size": 5, "max_overflow": 10}

"""Mailkey: the Flask application factory."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flask import Flask, Response, g, request
from werkzeug.middleware.proxy_fix import ProxyFix

from webapp.config import Settings

REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def create_app(config: Mapping[str, Any] | None = None, settings: Settings | None = None) -> Flask:
    settings = settings or Settings.from_env()
    # No app-wide /static route: the docs and the console serve their own assets.
    app = Flask(
        __name__,
        instance_path=settings.INSTANCE_PATH,
        instance_relative_config=True,
        static_folder=None,
    )
    app.config.from_mapping(settings.as_flask_config())
    if config:
        app.config.update(config)
    Path(app.instance_path).mkdir(parents=True, exist_ok=True)

    register_logging(app)
    register_extensions(app)
    register_blueprints(app)
    register_errorhandlers(app)
    register_request_hooks(app)
    register_commands(app)
    if app.config["TRUSTED_PROXY_COUNT"]:
        count = app.config["TRUSTED_PROXY_COUNT"]
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app, x_for=count, x_proto=count, x_host=count, x_port=count
        )
    return app


def register_logging(app: Flask) -> None:
    from webapp.logs import configure_logging

    configure_logging(app.config["LOG_LEVEL"], app.config["LOG_FORMAT"])


def register_extensions(app: Flask) -> None:
    from webapp.api import api, api_config
    from webapp.crypto import Keyring, init_keyring
    from webapp.extensions import db, migrate, ping_when_idle, redis_store
    from webapp.metrics import init_metrics
    from webapp.worker import celery_init_app

    init_keyring(Keyring.from_settings(app.config["ENCRYPTION"]))
    db.init_app(app)
    with app.app_context():
        ping_when_idle(db.engine)
    migrate.init_app(app, db, directory=str(Path(__file__).parent.parent / "migrations"))
    redis_store.init_app(app)
    for key, value in api_config().items():
        app.config.setdefault(key, value)
    api.init_app(app)
    celery_init_app(app)
    init_metrics(app)


def register_blueprints(app: Flask) -> None:
    from webapp.api import register_api_blueprints
    from webapp.probes import blueprint as probes

    app.register_blueprint(probes)
    register_api_blueprints(app)
    from webapp.console import init_console

    init_console(app)


def register_errorhandlers(app: Flask) -> None:
    from webapp.errors import register_errorhandlers as register

    register(app)


def register_commands(app: Flask) -> None:
    from webapp.cli import register_cli

    register_cli(app)


def register_request_hooks(app: Flask) -> None:
    import logging

    access = logging.getLogger("mailkey.request")

    @app.before_request
    def _start() -> None:
        incoming = request.headers.get("X-Request-ID", "")
        g.request_id = incoming if REQUEST_ID.match(incoming) else uuid.uuid4().hex
        g.started = time.perf_counter()

    @app.after_request
    def _finish(response: Response) -> Response:
        response.headers["X-Request-ID"] = getattr(g, "request_id", "")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault(
            "Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'"
        )
        if request.path.startswith("/api/"):
            response.headers.setdefault("Cache-Control", "no-store")
        if app.config["MAILKEY_ENV"] == "production":
            response.headers.setdefault(
                "Strict-Transport-Security", "max-age=31536000; includeSubDomains"
            )
        if request.path not in ("/healthz", "/metrics"):
            access.debug(
                "%s %s %s",
                request.method,
                request.path,
                response.status_code,
                extra={
                    "event": "http_request",
                    "status": response.status_code,
                    "duration_ms": round((time.perf_counter() - g.get("started", 0)) * 1000, 1),
                },
            )
        return response

"""Celery bound to the Flask app: every task runs inside an app context."""

from __future__ import annotations

from typing import Any

from celery import Celery, Task
from flask import Flask


def beat_schedule(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The schedule is data; beat tasks only select ids and enqueue per-item tasks."""
    return {
        "refresh-expiring-tokens": {
            "task": "tasks.refresh.refresh_expiring_tokens",
            "schedule": float(config["REFRESH_SCAN_SECONDS"]),
            "options": {"expires": float(config["REFRESH_SCAN_SECONDS"])},
        },
        "keep-tokens-alive": {
            "task": "tasks.refresh.keep_tokens_alive",
            "schedule": 86400.0,
        },
        "sync-due-accounts": {
            "task": "tasks.sync.sync_due_accounts",
            "schedule": float(min(60, config["SYNC_INTERVAL_SECONDS"])),
            "options": {"expires": 60.0},
        },
    }


def celery_init_app(app: Flask) -> Celery:
    class FlaskTask(Task):
        def __call__(self, *args: object, **kwargs: object) -> object:
            with app.app_context():
                return self.run(*args, **kwargs)

    celery_app = Celery(app.name, task_cls=FlaskTask)
    celery_app.config_from_object("celeryconfig")
    celery_app.conf.update(
        broker_url=app.config["REDIS_URL"],
        result_backend=app.config["REDIS_URL"],
        redbeat_redis_url=app.config["REDIS_URL"],
        beat_schedule=beat_schedule(app.config),
    )
    celery_app.flask_app = app  # type: ignore[attr-defined]
    celery_app.conf.update(app.config.get("CELERY", {}))
    celery_app.set_default()
    app.extensions["celery"] = celery_app
    return celery_app

"""Celery tasks. `celery -A tasks worker` finds the Celery app as `tasks.app`.

The Flask app (and with it the Celery app) is created on first use, so tests can
bind Celery to their own Flask app and import task modules without side effects.
"""

from __future__ import annotations

import os
from typing import Any

from celery import signals

_state: dict[str, Any] = {}


def __getattr__(name: str) -> Any:
    if name in ("app", "flask_app"):
        if "flask_app" not in _state:
            from webapp import create_app

            _state["flask_app"] = create_app()
        flask_app = _state["flask_app"]
        return flask_app if name == "flask_app" else flask_app.extensions["celery"]
    raise AttributeError(name)


@signals.setup_logging.connect
def _keep_our_logging(**_kwargs: Any) -> None:
    """Connected, so Celery leaves logging to create_app (redacting formatter)."""


@signals.worker_process_init.connect
def _reset_db_engine(**_kwargs: Any) -> None:
    """A forked pool process must not share the parent's database connections."""
    from celery import current_app

    flask_app = getattr(current_app, "flask_app", None)
    if flask_app is not None:
        from webapp.extensions import db

        with flask_app.app_context():
            db.engine.dispose(close=False)


@signals.worker_process_shutdown.connect
def _mark_metrics_process_dead(**_kwargs: Any) -> None:
    from celery import current_app

    flask_app = getattr(current_app, "flask_app", None)
    if flask_app is not None and flask_app.config.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid())


@signals.task_retry.connect
def _count_retry(sender: Any = None, **_kwargs: Any) -> None:
    from webapp.metrics import TASK_RETRIES_TOTAL

    TASK_RETRIES_TOTAL.labels(task=getattr(sender, "name", "unknown")).inc()


@signals.task_postrun.connect
def _remove_session(**_kwargs: Any) -> None:
    from celery import current_app

    flask_app = getattr(current_app, "flask_app", None)
    if flask_app is not None:
        from webapp.extensions import db

        with flask_app.app_context():
            db.session.remove()

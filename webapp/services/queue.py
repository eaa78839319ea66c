"""Enqueueing Celery tasks by name, so services never import the tasks package."""

from __future__ import annotations

from typing import Any

from flask import current_app


def enqueue(task_name: str, *args: Any, countdown: float | None = None) -> str:
    celery = current_app.extensions["celery"]
    result = celery.send_task(task_name, args=list(args), countdown=countdown)
    return str(result.id)

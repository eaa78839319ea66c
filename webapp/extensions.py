"""Extensions, created unbound and bound in the app factory."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from flask import Flask, current_app
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy
from redis.exceptions import LockError
from sqlalchemy import event
from sqlalchemy.engine import Engine

from webapp.models.base import Base

db = SQLAlchemy(model_class=Base)
migrate = Migrate(compare_type=True, render_as_batch=True)


class RedisStore:
    """One redis-py client per app: locks, OAuth state, refresh markers."""

    @contextmanager
    def locked(self, name: str, timeout: float, wait: float | None = None) -> Iterator[bool]:
        """Hold the Redis lock `name` (expiring after `timeout` s) and yield whether it
        was taken: at once when `wait` is None, else within `wait` seconds. It is
        released at the end unless it already expired on its own."""
        lock = self.client.lock(name, timeout=timeout)
        acquired = lock.acquire(blocking=wait is not None, blocking_timeout=wait)
        try:
            yield bool(acquired)
        finally:
            if acquired:
                try:
                    lock.release()
                except LockError:
                    pass  # expired: another holder may have it now, nothing to undo

    def init_app(self, app: Flask) -> None:
        app.extensions["redis"] = redis.Redis.from_url(
            app.config["REDIS_URL"],
            socket_timeout=5,
            socket_connect_timeout=3,
            health_check_interval=30,
        )

    @property
    def client(self) -> redis.Redis:
        return current_app.extensions["redis"]


redis_store = RedisStore()


@event.listens_for(Engine, "connect")
def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """SQLite is for one developer: WAL and a busy timeout keep processes from tripping."""
    if type(dbapi_connection).__module__.startswith("sqlite3"):
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

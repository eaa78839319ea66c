"""Extensions, created unbound and bound in the app factory."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from flask import Flask, current_app
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy
from redis.exceptions import LockError
from sqlalchemy import event, exc
from sqlalchemy.engine import Engine

from webapp.models.base import Base

log = logging.getLogger("mailkey.locks")
db = SQLAlchemy(model_class=Base)
migrate = Migrate(compare_type=True, render_as_batch=True)


class RedisStore:
    """One redis-py client per app: locks, OAuth state, refresh markers."""

    @contextmanager
    def locked(
        self,
        name: str,
        timeout: float,
        wait: float | None = None,
        heartbeat_for: float | None = None,
    ) -> Iterator[bool]:
        """Hold the Redis lock `name` (expiring after `timeout` s) and yield whether it
        was taken: at once when `wait` is None, else within `wait` seconds. It is
        released at the end unless it already expired on its own.

        With `heartbeat_for`, a thread renews the lock every timeout/3 s for up to that
        many seconds: a long holder keeps it, and a killed one (SIGKILL, OOM) lets it go
        within `timeout` s instead of blocking every other process for the whole run."""
        lock = self.client.lock(name, timeout=timeout, thread_local=heartbeat_for is None)
        acquired = lock.acquire(blocking=wait is not None, blocking_timeout=wait)
        stop, keeper = threading.Event(), None
        if acquired and heartbeat_for:
            keeper = threading.Thread(
                target=_renew, args=(lock, timeout / 3, heartbeat_for, stop),
                name=f"lock-heartbeat {name}", daemon=True,
            )  # fmt: skip
            keeper.start()
        try:
            yield bool(acquired)
        finally:
            stop.set()
            if keeper is not None:
                keeper.join()  # no renewal racing the release
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


def _renew(lock: Any, every: float, lasting: float, stop: threading.Event) -> None:
    deadline = time.monotonic() + lasting
    while not stop.wait(every) and time.monotonic() < deadline:
        try:
            lock.reacquire()
        except LockError:  # expired (Redis unreachable for a whole TTL) or taken
            log.warning("lock_lost", extra={"event": "lock_lost", "lock": lock.name})
            return
        except redis.RedisError as exc:  # try again at the next beat
            log.warning(
                "lock_renew_failed: %s",
                exc,
                extra={"event": "lock_renew_failed", "lock": lock.name},
            )


@event.listens_for(Engine, "connect")
def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """SQLite is for one developer: WAL and a busy timeout keep processes from tripping."""
    if type(dbapi_connection).__module__.startswith("sqlite3"):
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()


# A pooled connection is pinged before use unless it was returned less than this long
# ago (HikariCP's aliveBypassWindowMs, 500 ms by default, for the same reason): under
# load every checkout would otherwise pay a round trip for a connection that just
# worked. A server restart within the window costs one failed statement per process,
# after which SQLAlchemy replaces the pool's connections.
PING_AFTER_IDLE_SECONDS = 0.5


def ping_when_idle(engine: Engine) -> None:
    """pool_pre_ping, skipped for a connection returned within PING_AFTER_IDLE_SECONDS.
    A dead connection invalidates the pool and the checkout is retried on a new one."""
    dialect = engine.dialect

    def returned(_dbapi_connection: Any, record: Any) -> None:
        if record is not None:
            record.info["returned_at"] = time.monotonic()

    def checked_out(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        returned_at = record.info.get("returned_at")
        if returned_at is None or time.monotonic() - returned_at < PING_AFTER_IDLE_SECONDS:
            return  # new, or just used
        try:
            dialect.do_ping(dbapi_connection)
        except dialect.loaded_dbapi.Error as err:
            if dialect.is_disconnect(err, dbapi_connection, None):
                raise exc.InvalidatePoolError() from err
            raise

    event.listen(engine, "checkin", returned)
    event.listen(engine, "checkout", checked_out)

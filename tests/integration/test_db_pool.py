"""Pooled connections are pinged on checkout after idling, and a dead one is replaced."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from webapp import extensions


@pytest.fixture
def engine(database_url, monkeypatch):
    monkeypatch.setattr(extensions, "PING_AFTER_IDLE_SECONDS", 0.2)
    engine = sa.create_engine(database_url, pool_size=1, max_overflow=0)
    extensions.ping_when_idle(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def pings(engine, monkeypatch):
    """One entry per ping the engine's pool sends."""
    sent: list[int] = []
    ping = engine.dialect.do_ping
    monkeypatch.setattr(engine.dialect, "do_ping", lambda conn: sent.append(1) or ping(conn))
    return sent


def backend_pid(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()


def test_a_connection_killed_while_idle_is_replaced_at_checkout(engine, database_url):
    pid = backend_pid(engine)
    killer = sa.create_engine(database_url, poolclass=sa.pool.NullPool)
    with killer.connect() as conn:  # as a server restart or an idle timeout would
        assert conn.exec_driver_sql(f"SELECT pg_terminate_backend({pid})").scalar_one()
    killer.dispose()
    time.sleep(0.3)
    assert backend_pid(engine) != pid  # no error: the ping found it dead


def test_a_connection_returned_just_now_is_not_pinged(engine, pings):
    pid = backend_pid(engine)  # a new connection: never pinged
    assert backend_pid(engine) == pid and pings == []
    time.sleep(0.3)
    assert backend_pid(engine) == pid and pings == [1]


def test_the_ping_outlives_dispose_as_a_forked_worker_does_it(engine, pings):
    """Celery's prefork children dispose the inherited pool (tasks/__init__.py)."""
    engine.dispose(close=False)
    backend_pid(engine)
    time.sleep(0.3)
    backend_pid(engine)
    assert pings == [1]

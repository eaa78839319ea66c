"""Throw-away PostgreSQL databases for the tests and the benchmarks."""

from __future__ import annotations

import sqlalchemy as sa


def drop_database(url: str, *, create: bool = False) -> None:
    """End every connection to the database of `url`, drop it, and create it empty
    again when `create` is set. Callers check the name first: this destroys data."""
    target = sa.engine.make_url(url)
    name = target.database or ""
    admin = sa.create_engine(target.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :name AND pid <> pg_backend_pid()"
                ),
                {"name": name},
            )
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
            if create:
                conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()

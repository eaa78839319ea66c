"""Benchmark GET /api/v1/health/oauth-tokens on PostgreSQL with one large organization.

Loads (once) one organization with 1,000,000 tokens and 5,000,000 refresh attempts
spread over 30 days into a dedicated database, then times the endpoint through the
Flask test client, twice: "cold" drops the health snapshot before every request so
each one runs the SQL; "served" is the endpoint as deployed (a computation slower
than 100 ms is kept as a 30 s snapshot, see webapp/services/health.py).
Target: median under 100 ms.

    .venv/bin/python bench/health.py                    # full size
    .venv/bin/python bench/health.py --rows 100000 --attempts 500000   # quick run
    .venv/bin/python bench/health.py --explain          # also EXPLAIN ANALYZE the queries
    .venv/bin/python bench/health.py --indexes proposed # with the proposed indexes

BENCH_DATABASE_URL (default postgresql+psycopg://postgres@127.0.0.1:5432/mailkey_bench)
is created when missing and migrated. Data already there with the requested counts is
reused; other counts replace it (the full load takes several minutes). Health never
decrypts, so the ciphertext columns hold a fixed dummy value.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from webapp import create_app  # noqa: E402
from webapp.auth import issue_token  # noqa: E402
from webapp.config import Settings  # noqa: E402
from webapp.crypto import generate_keys  # noqa: E402

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/mailkey_bench"
ORG = 1
URL = "/api/v1/health/oauth-tokens"
TARGET_MS = 100.0
JWT_SECRET = "bench-jwt-secret-" + "b" * 47  # 64 characters
DUMMY_CIPHERTEXT = "v1:00000000:x"

# Indexes proposed for the health queries (the migration is the lead's to write):
# --indexes proposed creates them here, --indexes none drops them, to compare.
PROPOSED_INDEXES = {
    # Index-only scan of the token counts; a superset of ix_user_email_tokens_org_status.
    "ix_user_email_tokens_org_status_provider_expires": (
        "ON user_email_tokens (organization_id, status, provider, expires_at)"
    ),
    # Index-only scan of the last 24 h of attempts; replaces ix_token_refresh_attempts_org_started.
    "ix_token_refresh_attempts_org_started_cover": (
        "ON token_refresh_attempts (organization_id, started_at) INCLUDE (provider, outcome)"
    ),
}

LOAD_TOKENS = """
INSERT INTO user_email_tokens (
    id, user_id, organization_id, provider, email_address,
    access_token_encrypted, refresh_token_encrypted, token_type, scopes,
    expires_at, status, refresh_failure_count, created_at, updated_at)
SELECT g, g, :org,
    (ARRAY['google', 'microsoft', 'yahoo'])[1 + g % 3],
    'user' || g || '@example.com',
    :ciphertext, :ciphertext, 'Bearer', 'openid email',
    CASE WHEN g % 50 = 0 THEN NULL
         -- access tokens live an hour: most expire in the next hour, some lapsed long ago
         ELSE now() + (random() * 90 - 20) * interval '1 minute'
              - CASE WHEN g % 10 = 0 THEN interval '3 days' ELSE interval '0' END
    END,
    CASE WHEN g % 20 = 0 THEN 'needs_reauth' WHEN g % 33 = 0 THEN 'revoked' ELSE 'active' END,
    0, now() - interval '60 days', now()
FROM generate_series(1, :rows) AS g
"""

LOAD_ATTEMPTS = """
INSERT INTO token_refresh_attempts (
    token_id, organization_id, provider, started_at, finished_at, outcome,
    error_code, http_status, duration_ms, trigger)
SELECT t, :org,
    (ARRAY['google', 'microsoft', 'yahoo'])[1 + t % 3],
    s, s + interval '300 milliseconds',
    CASE WHEN g % 40 = 0 THEN 'transient_error'
         WHEN g % 97 = 0 THEN 'permanent_error'
         WHEN g % 499 = 0 THEN 'config_error'
         ELSE 'success' END,
    NULL, 200, 300, 'beat'
FROM (
    SELECT g,
        1 + (g::bigint * 7919) % :rows AS t,
        now() - (g::float8 / :attempts) * interval '30 days' AS s
    FROM generate_series(1, :attempts) AS g
) AS series
"""


def settings_env(database_url: str, instance: str) -> dict[str, str]:
    return {
        "MAILKEY_ENV": "test",
        "MAILKEY_INSTANCE_PATH": instance,
        "DATABASE_URL": database_url,
        "REDIS_URL": "redis://127.0.0.1:6379/14",
        "API_JWT_SECRET": JWT_SECRET,
        "FLOWER_BASIC_AUTH": "bench:bench",
        "LOG_LEVEL": "WARNING",
        **generate_keys(),
    }


def ensure_database(url: str) -> None:
    target = sa.engine.make_url(url)
    admin = sa.create_engine(target.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            exists = conn.scalar(
                sa.text("SELECT 1 FROM pg_database WHERE datname = :name"),
                {"name": target.database},
            )
            if not exists:
                conn.execute(sa.text(f'CREATE DATABASE "{target.database}"'))
                print(f"created database {target.database}")
    finally:
        admin.dispose()


def counts(conn: sa.Connection) -> tuple[int, int]:
    tokens = conn.scalar(
        sa.text("SELECT count(*) FROM user_email_tokens WHERE organization_id = :org"),
        {"org": ORG},
    )
    attempts = conn.scalar(
        sa.text("SELECT count(*) FROM token_refresh_attempts WHERE organization_id = :org"),
        {"org": ORG},
    )
    return int(tokens or 0), int(attempts or 0)


def load(engine: sa.Engine, rows: int, attempts: int) -> None:
    with engine.connect() as conn:
        have = counts(conn)
    if have == (rows, attempts):
        print(f"reusing data: {rows:,} tokens, {attempts:,} refresh attempts")
        return
    print(f"loading {rows:,} tokens and {attempts:,} refresh attempts (found {have}) ...")
    started = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "TRUNCATE token_refresh_attempts, user_email_tokens, mail_accounts "
                "RESTART IDENTITY CASCADE"
            )
        )
        params = {"org": ORG, "rows": rows, "attempts": attempts, "ciphertext": DUMMY_CIPHERTEXT}
        conn.execute(sa.text(LOAD_TOKENS), params)
        conn.execute(sa.text("SELECT setval('user_email_tokens_id_seq', :rows)"), params)
        print(f"  tokens in {time.perf_counter() - started:.1f} s")
        conn.execute(sa.text(LOAD_ATTEMPTS), params)
        print(f"  attempts in {time.perf_counter() - started:.1f} s")
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE user_email_tokens"))
        conn.execute(sa.text("VACUUM ANALYZE token_refresh_attempts"))
    print(f"  loaded and analyzed in {time.perf_counter() - started:.1f} s")


def set_indexes(engine: sa.Engine, choice: str) -> None:
    if choice == "keep":
        return
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for name, definition in PROPOSED_INDEXES.items():
            if choice == "proposed":
                conn.execute(sa.text(f"CREATE INDEX IF NOT EXISTS {name} {definition}"))
            else:
                conn.execute(sa.text(f"DROP INDEX IF EXISTS {name}"))
        conn.execute(sa.text("VACUUM ANALYZE user_email_tokens"))
        conn.execute(sa.text("VACUUM ANALYZE token_refresh_attempts"))
        present = conn.scalars(
            sa.text(
                "SELECT indexname FROM pg_indexes WHERE tablename IN "
                "('user_email_tokens', 'token_refresh_attempts') ORDER BY indexname"
            )
        ).all()
    print("indexes: " + ", ".join(present))


def explain(app: Any, client: Any, headers: dict[str, str]) -> None:
    """EXPLAIN ANALYZE the statements one request runs, as the request ran them."""
    from webapp.extensions import db

    captured: list[tuple[str, Any]] = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("SELECT"):
            captured.append((statement, parameters))

    with app.app_context():
        engine = db.engine
    sa.event.listen(engine, "before_cursor_execute", capture)
    try:
        client.get(URL, headers=headers)
    finally:
        sa.event.remove(engine, "before_cursor_execute", capture)
    with engine.connect() as conn:
        for statement, parameters in captured:
            print("\n" + statement.strip())
            plan = conn.exec_driver_sql(
                "EXPLAIN (ANALYZE, BUFFERS) " + statement, parameters
            ).scalars()
            print("\n".join(plan))


def percentile(ordered: list[float], fraction: float) -> float:
    """Nearest rank."""
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="tokens to load")
    parser.add_argument("--attempts", type=int, default=5_000_000, help="refresh attempts")
    parser.add_argument("--runs", type=int, default=30, help="timed requests")
    parser.add_argument("--warmup", type=int, default=3, help="untimed requests first")
    parser.add_argument(
        "--indexes",
        choices=["keep", "none", "proposed"],
        default="keep",
        help="create (proposed) or drop (none) the proposed indexes first; keep: as they are",
    )
    parser.add_argument("--explain", action="store_true", help="EXPLAIN ANALYZE the queries")
    args = parser.parse_args()
    if args.rows < 1 or args.attempts < 0 or args.runs < 1:
        parser.error("--rows and --runs must be positive, --attempts not negative")

    database_url = os.environ.get("BENCH_DATABASE_URL", DEFAULT_URL)
    ensure_database(database_url)
    from flask_migrate import upgrade

    with tempfile.TemporaryDirectory(prefix="mailkey-bench-") as instance:
        app = create_app(settings=Settings.from_env(settings_env(database_url, instance)))
        with app.app_context():
            from webapp.extensions import db

            upgrade(directory=str(ROOT / "migrations"))
            load(db.engine, args.rows, args.attempts)
            set_indexes(db.engine, args.indexes)

        token = issue_token(JWT_SECRET, user_id=1, organization_id=ORG, admin=True)
        headers = {"Authorization": f"Bearer {token}"}
        client = app.test_client()
        with app.app_context():
            from webapp.services.health import SNAPSHOT_PREFIX

            redis_client = app.extensions["redis"]
            snapshot_key = f"{SNAPSHOT_PREFIX}oauth-tokens:{ORG}:24"
            redis_client.delete(snapshot_key)

            def forget_snapshot() -> None:
                redis_client.delete(snapshot_key)

            # Cold: the snapshot is dropped before every request, so each one runs the SQL.
            cold, body = time_requests(client, headers, args, before=forget_snapshot)
            # Served: as deployed; the warm-up's slow computation is kept as a snapshot.
            served, _ = time_requests(client, headers, args)
            if args.explain:
                forget_snapshot()
                explain(app, client, headers)

    print(
        f"\n{URL}: {args.rows:,} tokens, {args.attempts:,} attempts "
        f"({body['refresh_attempts_24h']:,} in 24 h, total {body['total']:,}); "
        f"runs={args.runs} warmup={args.warmup}"
    )
    verdicts = [report("cold (SQL every request)", cold), report("served (with snapshot)", served)]
    return 0 if verdicts[-1] else 1


def time_requests(
    client: Any, headers: dict[str, str], args: argparse.Namespace, before: Any = None
) -> tuple[list[float], dict[str, Any]]:
    for _ in range(args.warmup):
        if before:
            before()
        response = client.get(URL, headers=headers)
        assert response.status_code == 200, response.json
    timings: list[float] = []
    for _ in range(args.runs):
        if before:
            before()
        started = time.perf_counter()
        response = client.get(URL, headers=headers)
        timings.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200, response.json
    return sorted(timings), response.json


def report(label: str, timings: list[float]) -> bool:
    median = statistics.median(timings)
    passed = median < TARGET_MS
    print(
        f"{label:26s} median {median:7.1f} ms  p95 {percentile(timings, 0.95):7.1f} ms  "
        f"min {timings[0]:7.1f} ms  target median < {TARGET_MS:.0f} ms: "
        f"{'PASS' if passed else 'FAIL'}"
    )
    return passed


if __name__ == "__main__":
    sys.exit(main())

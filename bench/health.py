"""Benchmark GET /api/v1/health/oauth-tokens on PostgreSQL with one large organization.

Loads (once) one organization with 1,000,000 tokens and 5,000,000 refresh attempts
spread over 30 days into a dedicated database, then times the endpoint through the
Flask test client. Target: median under 100 ms.

    .venv/bin/python bench/health.py                    # full size
    .venv/bin/python bench/health.py --rows 100000 --attempts 500000   # quick run
    .venv/bin/python bench/health.py --explain          # also EXPLAIN ANALYZE the queries

BENCH_DATABASE_URL (default postgresql+psycopg://postgres@127.0.0.1:5432/mailkey_bench)
is created when missing and migrated. Data already there with the requested counts is
reused. Health never decrypts, so the ciphertext columns hold a fixed dummy value.
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


def with_health_blueprint() -> None:
    """Until the health blueprint is registered in webapp.api.v1, add it here."""
    import webapp.api.v1 as v1
    from webapp.api.v1.health import blueprint

    if blueprint not in v1.BLUEPRINTS:
        v1.BLUEPRINTS = [*v1.BLUEPRINTS, blueprint]


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
    parser.add_argument("--explain", action="store_true", help="EXPLAIN ANALYZE the queries")
    args = parser.parse_args()
    if args.rows < 1 or args.attempts < 0 or args.runs < 1:
        parser.error("--rows and --runs must be positive, --attempts not negative")

    database_url = os.environ.get("BENCH_DATABASE_URL", DEFAULT_URL)
    ensure_database(database_url)
    with_health_blueprint()
    from flask_migrate import upgrade

    with tempfile.TemporaryDirectory(prefix="mailkey-bench-") as instance:
        app = create_app(settings=Settings.from_env(settings_env(database_url, instance)))
        with app.app_context():
            from webapp.extensions import db

            upgrade(directory=str(ROOT / "migrations"))
            load(db.engine, args.rows, args.attempts)

        token = issue_token(JWT_SECRET, user_id=1, organization_id=ORG, admin=True)
        headers = {"Authorization": f"Bearer {token}"}
        client = app.test_client()
        for _ in range(args.warmup):
            response = client.get(URL, headers=headers)
            assert response.status_code == 200, response.json
        timings: list[float] = []
        for _ in range(args.runs):
            started = time.perf_counter()
            response = client.get(URL, headers=headers)
            timings.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200, response.json
        body = response.json
        if args.explain:
            explain(app, client, headers)

    timings.sort()
    median = statistics.median(timings)
    p95 = percentile(timings, 0.95)
    verdict = "PASS" if median < TARGET_MS else "FAIL"
    print(
        f"\n{URL}: {args.rows:,} tokens, {args.attempts:,} attempts "
        f"({body['refresh_attempts_24h']:,} in 24 h, total {body['total']:,})"
    )
    print(f"runs={args.runs} warmup={args.warmup}")
    print(f"median {median:.1f} ms  p95 {p95:.1f} ms  min {timings[0]:.1f} ms")
    print(f"target median < {TARGET_MS:.0f} ms: {verdict}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())

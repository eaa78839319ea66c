"""Benchmark token refreshes: Mailkey's refresh service vs bare HTTP refresh_token grants.

The same N refreshes, sequentially and on --threads threads, all sent to one provider:

- Mailkey: webapp.services.tokens.refresh_token(id, trigger="bench", force=True), each call
  in its own app context as a Celery task runs it (Redis lock, row read, decrypt, HTTP,
  encrypt, one statement writing the new tokens and the attempt row, unlock);
- bare: requests.Session().post(grant_type=refresh_token) per thread, JSON parsed;
- floor: Mailkey's round trips with no framework (see floor_refresh).

The provider is oauth2-mock-server by default, the npm server the issue names, in a Node
process of its own as a real provider is: it signs a JWT access token and rotates the
refresh token on every grant. --provider local uses the tests' provider instead
(tests/support/oauth_provider.py): it runs in this process, sharing its interpreter lock
and CPU with the code being measured, and answers from a dict in ~1 ms (TCP_NODELAY, see
bench/_common.py); it counts every token call, and --latency-ms adds a real provider's
delay to each answer. Best of --repeats, interleaved. Target: Mailkey/bare >= 0.5 in both
modes. --profile (or a miss) prints the SQL and time per phase.

    .venv/bin/python bench/refresh.py [--tokens 500] [--threads 4] [--profile]
        [--provider oauth2-mock-server|local] [--latency-ms 0 (local only)]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import requests
from _common import (
    Timer,
    bench_app,
    local_provider,
    oauth2_mock_server,
    phase_timers,
    provider_env,
    table,
    top_profile,
    verdict,
)
from sqlalchemy import event, func, select

from tests.support.flows import stored_grant
from tests.support.oauth_provider import OAuthProvider, ScriptedResponse
from webapp.extensions import db
from webapp.models import TokenRefreshAttempt, utcnow
from webapp.services.tokens import refresh_token

TARGET = 0.5


def create_tokens(provider: OAuthProvider, count: int) -> list[tuple[int, str]]:
    """(token id, refresh token) pairs: provider-issued grants stored through the service."""
    expires_at = utcnow() + timedelta(hours=1)
    rows = [stored_grant(provider, f"bench{i}@example.com", expires_at, user_id=i)
            for i in range(count)]  # fmt: skip
    db.session.commit()
    return [(token.id, issued["refresh_token"]) for token, issued in rows]


def floor_refresh(app: Any, token_url: str, form: dict[str, str]) -> Callable[[Any], None]:
    """A refresh with no framework at all: the lower bound of what a durable, locked
    refresh costs on this machine, with the round trips Mailkey's makes. Per call: Redis
    SET NX, a psycopg SELECT of the row (autocommit), AES-GCM decrypt, the same POST as
    bare, AES-GCM encrypt of the new token, one autocommitted statement inserting the
    attempt and updating the token, Redis DEL."""
    import base64
    import os

    import psycopg
    import redis as redis_lib
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    dsn = app.config["SQLALCHEMY_DATABASE_URI"].replace("postgresql+psycopg", "postgresql")
    redis_url = app.config["REDIS_URL"]
    local = threading.local()
    cipher = AESGCM(AESGCM.generate_key(256))
    aad = b"floor|access_token_encrypted"

    def seal(text: str) -> str:
        nonce = os.urandom(12)
        return base64.urlsafe_b64encode(nonce + cipher.encrypt(nonce, text.encode(), aad)).decode()

    def floor(pair: tuple[int, str]) -> None:
        if not hasattr(local, "db"):
            local.db = psycopg.connect(dsn, autocommit=True)
            local.redis = redis_lib.Redis.from_url(redis_url)
            local.http = requests.Session()
        token_id, refresh_secret = pair
        lock = f"bench:floor:{token_id}"
        assert local.redis.set(lock, "1", nx=True, px=30_000)
        try:
            row = local.db.execute(
                "SELECT organization_id, provider, refresh_token_encrypted"
                " FROM user_email_tokens WHERE id = %s",
                (token_id,),
            ).fetchone()
            assert row is not None
            seal(refresh_secret)  # stands in for the decrypt: the same AES-GCM work
            started = utcnow()
            response = local.http.post(
                token_url,
                data={"grant_type": "refresh_token", "refresh_token": refresh_secret, **form},
                headers={"Accept": "application/json"},
                timeout=10,
            )
            answer = response.json()
            now = utcnow()
            local.db.execute(
                "WITH attempt AS (INSERT INTO token_refresh_attempts (token_id,"
                " organization_id, provider, started_at, finished_at, outcome, http_status,"
                " duration_ms, trigger) VALUES (%s, %s, %s, %s, %s, 'success', 200, 1, 'floor'))"
                " UPDATE user_email_tokens SET access_token_encrypted = %s, expires_at = %s,"
                " last_refreshed_at = %s, updated_at = %s WHERE id = %s",
                (token_id, row[0], row[1], started, now,
                 seal(answer["access_token"]), now + timedelta(hours=1), now, now, token_id),
            )  # fmt: skip
        finally:
            local.redis.delete(lock)

    return floor


def run(fn: Callable[[Any], None], items: list[Any], threads: int) -> float:
    with Timer() as t:
        if threads == 1:
            for item in items:
                fn(item)
        else:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(fn, items))
    return t.seconds


def explain_costs(app: Any, mailkey: Callable[[Any], None], pairs: list[Any]) -> None:
    """Sequential Mailkey refreshes with the SQL they run and the time per phase."""
    import redis.lock
    from sqlalchemy import Engine

    from webapp.services import tokens

    stats: dict[str, list[float]] = defaultdict(list)
    started: list[float] = []

    def before(*_args: Any) -> None:
        started.append(time.perf_counter())

    def after(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        words = statement.split()
        verb = words[0].upper()
        if verb == "WITH":  # the success path's write
            verb, name = "INSERT token_refresh_attempts +", "UPDATE user_email_tokens"
        elif verb == "SELECT":
            name = words[words.index("FROM") + 1] if "FROM" in words else ""
        else:
            name = words[1] if verb == "UPDATE" else words[2]
        stats[f"{verb} {name}"].append(time.perf_counter() - started.pop())

    def on_commit(_conn: Any) -> None:
        stats["COMMIT (not timed here; autocommit on PostgreSQL)"].append(0.0)

    targets = [
        (redis.lock.Lock, "acquire", "Redis lock acquire"),
        (redis.lock.Lock, "release", "Redis lock release"),
        (Engine, "connect", "pool checkout (pinged only after 0.5 s idle)"),
        (tokens, "decrypt_aes_gcm", "decrypt_aes_gcm"),
        (tokens, "token_request", "HTTP token_request (requests)"),
        (tokens, "encrypt_aes_gcm", "encrypt_aes_gcm"),
        (tokens, "_store_success", "write: new tokens + attempt (one statement)"),
    ]
    with app.app_context():
        engine = db.engine
    listeners = (("before_cursor_execute", before), ("after_cursor_execute", after))
    for name, fn in (*listeners, ("commit", on_commit)):
        event.listen(engine, name, fn)
    try:
        with phase_timers(targets) as phases:
            total = run(mailkey, pairs, 1)
    finally:
        for name, fn in (*listeners, ("commit", on_commit)):
            event.remove(engine, name, fn)
    count = len(pairs)
    print(f"\nSQL per Mailkey refresh ({count} sequential refreshes):")
    rows = [[k, len(v) / count, 1000 * sum(v) / len(v)] for k, v in stats.items()]
    table(["statement", "per refresh", "mean ms"], rows)
    print(f"\nphases per Mailkey refresh ({1000 * total / count:.2f} ms per refresh in all):")
    rows = [[k, calls / count, 1000 * spent / count, 1000 * cpu / count]
            for k, (calls, spent, cpu) in phases.items()]  # fmt: skip
    table(["phase", "calls", "ms per refresh", "CPU ms"], rows)
    profile = cProfile.Profile()
    seconds = profile.runcall(run, mailkey, pairs, 1)
    print(f"\ncProfile of {count} sequential refreshes ({seconds:.2f} s under the profiler):")
    top_profile(profile, 25, "tottime")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=500, help="refreshes per measurement")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="explain Mailkey's costs regardless")
    parser.add_argument(
        "--latency-ms", type=float, default=0, help="add this delay to every token answer"
    )
    parser.add_argument(
        "--provider-as-shipped", action="store_true", help="keep the fixture's ~40 ms stall"
    )
    parser.add_argument(
        "--provider",
        choices=("local", "oauth2-mock-server"),
        default="oauth2-mock-server",
        help="where every token request goes (oauth2-mock-server needs Node.js and npm; "
        "local: the tests' provider, in this process)",
    )
    args = parser.parse_args()
    if (args.latency_ms or args.provider_as_shipped) and args.provider != "local":
        parser.error(
            "--latency-ms and --provider-as-shipped change the local provider: "
            "use them with --provider local"
        )

    with contextlib.ExitStack() as stack:
        provider = stack.enter_context(local_provider(nodelay=not args.provider_as_shipped))
        token_url = provider.url("token")
        if args.provider == "oauth2-mock-server":  # the stored grants are the local one's
            token_url = stack.enter_context(oauth2_mock_server())
        env = {**provider_env(provider), "GOOGLE_TOKEN_URL": token_url}
        app, _env = stack.enter_context(bench_app("refresh", 9, lambda _: env))
        with app.app_context():
            pairs = create_tokens(provider, args.tokens)
        local = threading.local()
        form = {"client_id": provider.client_id, "client_secret": provider.client_secret}

        def bare(pair: tuple[int, str]) -> None:
            if not hasattr(local, "http"):
                local.http = requests.Session()
            response = local.http.post(
                token_url,
                data={"grant_type": "refresh_token", "refresh_token": pair[1], **form},
                headers={"Accept": "application/json"},
                timeout=10,
            )
            assert response.status_code == 200 and response.json()["access_token"]

        def mailkey(pair: tuple[int, str]) -> None:
            with app.app_context():
                assert refresh_token(pair[0], trigger="bench", force=True).refreshed

        floor = floor_refresh(app, token_url, form)
        for fn in (bare, mailkey, floor):  # warm-up: connections, pools, caches
            run(fn, pairs[:20], 1)
        best: dict[tuple[str, int], float] = {}
        calls_before = provider.calls["token"]
        for _ in range(args.repeats):
            for threads in (1, args.threads):
                for name, fn in (("bare", bare), ("mailkey", mailkey), ("floor", floor)):
                    if args.latency_ms:  # each token request waits, then is answered
                        delay = ScriptedResponse(delay=args.latency_ms / 1000)
                        provider.script("token", *[delay] * len(pairs))
                    seconds = run(fn, pairs, threads)
                    best[name, threads] = min(best.get((name, threads), seconds), seconds)
        with app.app_context():
            attempts = db.session.scalar(
                select(func.count()).where(TokenRefreshAttempt.outcome == "success")
            )
        expected = 3 * 2 * args.repeats * args.tokens
        if args.provider == "local":
            where = f"the local provider{f' +{args.latency_ms:g} ms' if args.latency_ms else ''}"
            calls = (
                f"token calls {provider.calls['token'] - calls_before:,} (expected "
                f"{expected:,}), provider errors {len(provider.errors)}"
            )
        else:
            where, calls = f"oauth2-mock-server at {token_url}", "every answer checked"
        print(
            f"\n{args.tokens:,} refreshes per run, best of {args.repeats}, against {where}; "
            f"{calls}; successful attempts recorded {attempts:,}"
        )
        rows, ok = [], True
        for threads in (1, args.threads):
            mk, raw, low = (best[name, threads] for name in ("mailkey", "bare", "floor"))
            ratio = raw / mk
            ok &= ratio >= TARGET
            overhead = (mk - raw) / args.tokens * 1000 * threads
            rows.append(
                [f"{threads} thread(s)", args.tokens / mk, args.tokens / raw, ratio, overhead,
                 args.tokens / low, raw / low]
            )  # fmt: skip
        table(
            ["mode", "Mailkey/s", "bare/s", "ratio", "Mailkey extra ms/refresh",
             "floor/s", "floor ratio"],
            rows,
        )  # fmt: skip
        print(
            "floor: the refresh's unavoidable round trips with no framework (Redis SET NX "
            "+ DEL, an autocommitted psycopg SELECT, AESGCM, the same HTTP call, one "
            "autocommitted INSERT + UPDATE statement); its ratio is the ceiling any "
            "refresh service with a lock, a re-read and a durable write reaches here"
        )
        print(f"target ratio >= {TARGET} in both modes")
        verdict("refresh service vs bare HTTP", ok)

        if args.profile or not ok:
            explain_costs(app, mailkey, pairs[: max(50, args.tokens // 5)])
    return 0


if __name__ == "__main__":
    sys.exit(main())

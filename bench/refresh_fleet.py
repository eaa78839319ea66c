"""Benchmark a fleet refresh: 10,000 due tokens, beat's fan-out, two real Celery workers.

All tokens expired (expires_at in the past). This process runs the local OAuth provider
and calls tasks.refresh.refresh_expiring_tokens() in the app context, as the worker that
beat hands it to would; two `celery -A tasks worker` subprocesses (same environment, so
their Flask app is built from the same DATABASE_URL, REDIS_URL, keys and provider URLs)
run the per-token tasks. Measured until every token has a successful refresh attempt:
wall time, tokens/s, the provider's peak requests/s (sampled every 0.1 s), Redis
used_memory (server-wide) and tokens refreshed more than once (must be 0).
Target: >= 100 tokens/s.

    .venv/bin/python bench/refresh_fleet.py [--tokens 10000] [--rate 200] [--pool threads]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta

from _common import (
    Timer,
    bench_app,
    celery_workers,
    local_provider,
    proc_stat,
    provider_env,
    table,
    verdict,
)
from sqlalchemy import func, select

from tests.support.flows import stored_grant
from tests.support.mailserver import group_pids
from webapp.extensions import db, redis_store
from webapp.models import TokenRefreshAttempt, UserEmailToken, utcnow

TARGET = 100.0


def create_due_tokens(provider: object, count: int) -> None:
    past = utcnow() - timedelta(minutes=5)
    for i in range(count):
        stored_grant(provider, f"fleet{i}@example.com", past, organization_id=1 + i % 10, user_id=i)
    db.session.commit()


def cpu_seconds(workers: list) -> float:
    """User + system CPU of every process in the workers' process groups (pool children too)."""
    total = 0
    for proc in workers:
        for pid in group_pids(proc.pid):
            if (stat := proc_stat(pid)) is not None:
                total += int(stat[1][11]) + int(stat[1][12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def sample(provider: object, redis_client: object, samples: list, stop: threading.Event) -> None:
    while not stop.is_set():
        memory = redis_client.info("memory")["used_memory"]  # type: ignore[attr-defined]
        samples.append((time.monotonic(), provider.calls["token"], memory))  # type: ignore[attr-defined]
        stop.wait(0.1)


def peak_rate(samples: list) -> float:
    """Highest request rate over any ~1 s window of the samples."""
    best, j = 0.0, 0
    for i, (t, calls, _) in enumerate(samples):
        while t - samples[j][0] > 1.0:
            j += 1
        if i > j and t - samples[j][0] >= 0.9:
            best = max(best, (calls - samples[j][1]) / (t - samples[j][0]))
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=10_000)
    parser.add_argument("--rate", type=int, default=200, help="REFRESH_FANOUT_RATE (tokens/s)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--pool", choices=("threads", "prefork"), default="threads")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--profile", action="store_true", help="profile the fan-out regardless")
    parser.add_argument("--profile-tasks", type=int, default=2000)
    args = parser.parse_args()

    with (
        local_provider() as provider,
        tempfile.TemporaryDirectory(prefix="mailkey-bench-fleet-") as logdir,
        bench_app(
            "refresh_fleet",
            10,
            lambda _: {**provider_env(provider), "REFRESH_FANOUT_RATE": str(args.rate)},
        ) as (app, env),
        app.app_context(),
    ):
        with Timer() as seeding:
            create_due_tokens(provider, args.tokens)
        print(f"created {args.tokens:,} due tokens in {seeding.seconds:.1f} s")
        with celery_workers(app, env, logdir, args.workers, args.pool, args.concurrency) as workers:
            redis_client = redis_store.client
            memory_before = redis_client.info("memory")["used_memory"]
            cpu_before = cpu_seconds(workers)
            samples: list = []
            stop = threading.Event()
            sampler = threading.Thread(target=sample, args=(provider, redis_client, samples, stop))
            sampler.start()

            from tasks.refresh import refresh_expiring_tokens

            started = datetime.now(UTC)
            with Timer() as fanout:
                enqueued = refresh_expiring_tokens()
            done, deadline = 0, time.monotonic() + args.timeout
            count_done = select(func.count(func.distinct(TokenRefreshAttempt.token_id))).where(
                TokenRefreshAttempt.outcome == "success"
            )
            while done < args.tokens and time.monotonic() < deadline:
                time.sleep(0.5)
                done = db.session.scalar(count_done) or 0
                db.session.rollback()
            stop.set()
            sampler.join()
            finished = db.session.scalar(select(func.max(TokenRefreshAttempt.finished_at)))
            memory_after = redis_client.info("memory")["used_memory"]
            worker_cpu = cpu_seconds(workers) - cpu_before
        repeated = db.session.scalar(
            select(func.count()).select_from(
                select(TokenRefreshAttempt.token_id)
                .group_by(TokenRefreshAttempt.token_id)
                .having(func.count() > 1)
                .subquery()
            )
        )
        failures = db.session.scalar(
            select(func.count()).where(TokenRefreshAttempt.outcome != "success")
        )
        wall = (finished - started).total_seconds() if finished else float("nan")
        rate = done / wall if done == args.tokens else 0.0
        mib = 1024 * 1024
        print(
            f"\n{args.workers} workers x {args.concurrency} ({args.pool}), "
            f"REFRESH_FANOUT_RATE={args.rate}/s"
        )
        table(
            ["measure", "value"],
            [
                ["tokens due / enqueued by the fan-out", f"{args.tokens:,} / {enqueued:,}"],
                ["fan-out call (select + SET NX + apply_async) (s)", fanout.seconds],
                ["tokens with a successful refresh", done],
                ["wall: fan-out start -> last refresh (s)", wall],
                ["tokens/s", rate],
                ["floor set by the fan-out spread: tokens / rate (s)", args.tokens / args.rate],
                ["last task due (fan-out time + (tokens-1) / rate) (s)",
                 fanout.seconds + (args.tokens - 1) / args.rate],
                ["provider token calls / peak requests/s (1 s window)",
                 f"{provider.calls['token']:,} / {peak_rate(samples):,.0f}"],
                ["Redis used_memory before / peak / after (MiB)",
                 f"{memory_before / mib:.1f} / {max(m for *_, m in samples) / mib:.1f} / "
                 f"{memory_after / mib:.1f}"],
                ["worker CPU per refreshed token (ms)", 1000 * worker_cpu / max(1, done)],
                [f"worker CPU used during the run (cores, of {os.cpu_count()})",
                 worker_cpu / wall],
                ["attempts not successful", failures],
                ["tokens refreshed more than once (must be 0)", repeated],
            ],
        )  # fmt: skip
        print(f"target >= {TARGET:.0f} tokens/s and no token refreshed twice")
        verdict("fleet refresh", rate >= TARGET and repeated == 0 and done == args.tokens)
        if args.profile or rate < TARGET:
            from _fanout_profile import profile_fanout

            ids = list(db.session.scalars(select(UserEmailToken.id).limit(args.profile_tasks)))
            profile_fanout(ids, args.rate)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The beat schedule: RedBeat with two beats running, and the sync fan-out's choice."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import redis
import sqlalchemy as sa

from tasks import sync as sync_tasks
from webapp.extensions import db
from webapp.models import MailAccount, utcnow

ROOT = Path(__file__).resolve().parents[2]


def test_two_beats_do_not_double_the_schedule(base_env, redis_url, app):
    """RedBeat's lock: a second beat started by mistake sends nothing while the first runs."""
    base, number = redis_url.rsplit("/", 1)
    beat_redis = f"{base}/{12 if number == '14' else 14}"  # never the suite's own DB
    client = redis.Redis.from_url(beat_redis)
    client.flushdb()
    env = {
        **os.environ,
        **base_env,
        "REDIS_URL": beat_redis,
        "REFRESH_SCAN_SECONDS": "5",
        "SYNC_INTERVAL_SECONDS": "3600",
    }
    beats = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "tasks",
                "beat",
                "-S",
                "redbeat.RedBeatScheduler",
                "--loglevel",
                "INFO",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(2)
    ]
    try:
        time.sleep(17)
    finally:
        for beat in beats:
            beat.terminate()
        for beat in beats:
            beat.wait(timeout=30)
    messages = [m.decode() for m in client.lrange("celery", 0, -1)]
    refresh_fanouts = sum("refresh_expiring_tokens" in m for m in messages)
    client.flushdb()
    # One beat every 5 s over ~17 s sends 3 or 4; two independent beats would send 6 to 8.
    assert 2 <= refresh_fanouts <= 4, refresh_fanouts


def _account(
    status: str,
    synced_minutes_ago: int | None,
    *,
    enabled: bool = True,
    updated_minutes_ago: int = 0,
) -> int:
    now = utcnow()
    account = MailAccount(
        organization_id=1,
        user_id=1,
        email_address=f"{status}-{synced_minutes_ago}-{enabled}-{updated_minutes_ago}@example.com",
        provider="custom",
        incoming_auth_method="password",
        incoming_server="imap.example.com",
        incoming_port=993,
        status=status,
        sync_enabled=enabled,
        last_synced_at=now - timedelta(minutes=synced_minutes_ago)
        if synced_minutes_ago is not None
        else None,
    )
    db.session.add(account)
    db.session.flush()
    db.session.execute(
        sa.update(MailAccount)
        .where(MailAccount.id == account.id)
        .values(updated_at=now - timedelta(minutes=updated_minutes_ago))
    )
    db.session.commit()
    return account.id


def test_sync_fanout_picks_due_and_healing_accounts_once(app, monkeypatch):
    due = _account("active", 10)
    never_synced = _account("active", None)
    _account("active", 1)  # synced a minute ago
    _account("active", 10, enabled=False)  # sync disabled
    _account("paused", 60)  # waits for a reconnect
    _account("error", 60, updated_minutes_ago=5)  # failed recently: not yet
    healing = _account("error", 60, updated_minutes_ago=20)  # SYNC_ERROR_RETRY_SECONDS passed
    sent: list[int] = []
    # Record what would go to the broker (these hosts do not exist).
    monkeypatch.setattr(sync_tasks.sync_account, "delay", sent.append)
    assert sync_tasks.sync_due_accounts() == 3
    assert sorted(sent) == sorted([due, never_synced, healing])
    # Still queued (marker set): a second fan-out does not enqueue them again.
    assert sync_tasks.sync_due_accounts() == 0
    assert len(sent) == 3


def test_issue_token_prints_the_token_alone(base_env):
    import jwt

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "flask",
            "auth",
            "issue-token",
            "--user-id",
            "7",
            "--org-id",
            "3",
            "--admin",
        ],
        cwd=ROOT,
        env={**os.environ, **base_env, "FLASK_APP": "webapp:create_app"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    claims = jwt.decode(lines[0], base_env["API_JWT_SECRET"], algorithms=["HS256"])
    assert claims["sub"] == "7" and claims["org"] == "3" and claims["roles"] == ["admin"]
    bad = subprocess.run(
        [sys.executable, "-m", "flask", "auth", "issue-token", "--user-id", "x"],
        cwd=ROOT,
        env={**os.environ, **base_env, "FLASK_APP": "webapp:create_app"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2

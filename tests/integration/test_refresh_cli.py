"""scripts/refresh_oauth_tokens.py run as a real subprocess against the test database,
real Redis and the local OAuth provider (and a real Celery worker for --enqueue)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.support.flows import connect
from webapp.extensions import db
from webapp.models import MailAccount, SyncRun, TokenRefreshAttempt, UserEmailToken, utcnow
from webapp.services import tokens as token_service

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = "scripts/refresh_oauth_tokens.py"
RESOURCE_KEYS = {
    "id",
    "provider",
    "email_address",
    "status",
    "status_reason",
    "scopes",
    "expires_at",
    "last_refreshed_at",
    "last_used_at",
    "refresh_failure_count",
    "last_refresh_error",
    "account_id",
    "created_at",
    "updated_at",
}


def run_cli(base_env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, SCRIPT, *args],
        env={**os.environ, **base_env},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def set_token(token_id: int, **values: object) -> None:
    db.session.execute(
        sa.update(UserEmailToken).where(UserEmailToken.id == token_id).values(**values)
    )
    db.session.commit()


def token_row(token_id: int) -> UserEmailToken:
    db.session.expire_all()
    return db.session.get(UserEmailToken, token_id)


def attempts() -> list[TokenRefreshAttempt]:
    db.session.expire_all()
    return list(db.session.scalars(sa.select(TokenRefreshAttempt).order_by("id")))


def attempted_ids() -> set[int]:
    return {attempt.token_id for attempt in attempts()}


def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError("condition not met in time")


def settle_initial_syncs() -> None:
    """Connecting enqueues each mailbox's first sync; let them finish (on Dovecot) before
    aging tokens, so no sync refreshes or touches a token while a CLI test looks at it."""

    def settled() -> bool:
        db.session.expire_all()
        accounts = set(db.session.scalars(sa.select(MailAccount.id)))
        runs = db.session.execute(sa.select(SyncRun.account_id, SyncRun.outcome)).all()
        finished = {account for account, outcome in runs if outcome != "running"}
        return finished == accounts and all(outcome != "running" for _, outcome in runs)

    wait_for(settled, timeout=60)


@pytest.fixture
def connect_many(client, auth_headers, oauth_provider, celery_worker, mail):
    def connect_all(plan: dict[str, tuple[str, str, dict[str, str]]]) -> dict[str, int]:
        ids = {}
        for name, (provider, email, owner) in plan.items():
            response = connect(client, owner, provider, oauth_provider, email)
            assert response.status_code == 201, response.json
            ids[name] = response.json["id"]
        settle_initial_syncs()
        return ids

    return connect_all


@pytest.fixture
def mailboxes(connect_many, auth_headers) -> dict[str, int]:
    """Five tokens connected through the real OAuth flow, then aged with SQL:
    soon (google, 1 h left), later (google, 20 days), expired (microsoft, 3 h ago),
    dead (yahoo, needs_reauth), far (google, another organization, 40 days)."""
    headers = auth_headers()
    plan = {
        "soon": ("google", "soon@example.com", headers),
        "later": ("google", "later@example.com", headers),
        "expired": ("microsoft", "expired@contoso.com", headers),
        "dead": ("yahoo", "dead@yahoo.example", headers),
        "far": ("google", "far@example.org", auth_headers(2, 5)),
    }
    ids = connect_many(plan)
    now = utcnow()
    set_token(ids["later"], expires_at=now + timedelta(days=20))
    set_token(ids["expired"], expires_at=now - timedelta(hours=3))
    set_token(ids["dead"], status="needs_reauth", status_reason="invalid_grant")
    set_token(ids["far"], expires_at=now + timedelta(days=40))
    return ids


def test_list_prints_a_table_with_every_token(base_env, mailboxes):
    result = run_cli(base_env, "--list")
    assert result.returncode == 0, result.stderr
    for address in (
        "soon@example.com",
        "later@example.com",
        "expired@contoso.com",
        "dead@yahoo.example",
        "far@example.org",
    ):
        assert address in result.stdout
    assert "expired 3h ago" in result.stdout
    assert "needs_reauth" in result.stdout
    assert "organization" in result.stdout and "last error" in result.stdout


def test_list_json_is_an_array_of_token_resources_without_secrets(base_env, mailboxes):
    result = run_cli(base_env, "--list", "--json")
    assert result.returncode == 0, result.stderr
    items = json.loads(result.stdout)
    assert [item["id"] for item in items] == sorted(mailboxes.values())
    assert all(set(item) == RESOURCE_KEYS for item in items)
    by_id = {item["id"]: item for item in items}
    assert by_id[mailboxes["expired"]]["status"] == "expired"
    assert by_id[mailboxes["dead"]]["status"] == "needs_reauth"
    assert by_id[mailboxes["soon"]]["expires_at"].endswith("Z")
    assert "encrypted" not in result.stdout and "v1:" not in result.stdout


def test_list_filters_by_status_and_provider(base_env, mailboxes):
    reauth = json.loads(run_cli(base_env, "--list", "--json", "--status", "needs_reauth").stdout)
    assert [item["id"] for item in reauth] == [mailboxes["dead"]]
    expired = json.loads(run_cli(base_env, "--list", "--json", "--status", "expired").stdout)
    assert [item["id"] for item in expired] == [mailboxes["expired"]]
    microsoft = json.loads(run_cli(base_env, "--list", "--json", "--provider", "microsoft").stdout)
    assert [item["id"] for item in microsoft] == [mailboxes["expired"]]
    google = run_cli(base_env, "--list", "--provider", "google").stdout
    assert "soon@example.com" in google and "expired@contoso.com" not in google


def test_refresh_all_refreshes_only_active_tokens_expiring_within_the_default_week(
    base_env, mailboxes, oauth_provider
):
    calls = oauth_provider.calls["token"]
    result = run_cli(base_env, "--refresh-all", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert {k: report[k] for k in ("refreshed", "skipped", "failed", "needs_reauth")} == {
        "refreshed": 2,
        "skipped": 0,
        "failed": 0,
        "needs_reauth": 0,
    }
    assert {r["id"] for r in report["results"]} == {mailboxes["soon"], mailboxes["expired"]}
    assert all(r["outcome"] == "refreshed" and r["error"] is None for r in report["results"])
    assert oauth_provider.calls["token"] == calls + 2
    assert attempted_ids() == {mailboxes["soon"], mailboxes["expired"]}
    assert {(a.outcome, a.trigger) for a in attempts()} == {("success", "cli")}
    assert token_row(mailboxes["expired"]).expires_at > utcnow() + timedelta(minutes=50)
    assert "token_refresh" in result.stderr  # the app's log lines go to stderr


def test_refresh_all_days_widens_the_window(base_env, mailboxes, oauth_provider):
    calls = oauth_provider.calls["token"]
    result = run_cli(base_env, "--refresh-all", "--days", "30")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == (
        "refreshed 3, skipped 0, failed 0, needs re-auth 0"
    )
    assert oauth_provider.calls["token"] == calls + 3
    assert attempted_ids() == {mailboxes["soon"], mailboxes["later"], mailboxes["expired"]}

    none_due = run_cli(base_env, "--refresh-all", "--days", "0", "--json")
    assert none_due.returncode == 0
    assert json.loads(none_due.stdout)["refreshed"] == 0


def test_refresh_all_with_provider_and_status_filters(base_env, mailboxes, oauth_provider):
    result = run_cli(base_env, "--refresh-all", "--provider", "google", "--days", "30", "--json")
    assert result.returncode == 0, result.stderr
    assert {r["id"] for r in json.loads(result.stdout)["results"]} == {
        mailboxes["soon"],
        mailboxes["later"],
    }
    expired = run_cli(base_env, "--refresh-all", "--status", "expired", "--json")
    assert [r["id"] for r in json.loads(expired.stdout)["results"]] == [mailboxes["expired"]]
    assert attempted_ids() == {mailboxes["soon"], mailboxes["later"], mailboxes["expired"]}


def test_dry_run_calls_no_provider_and_writes_nothing(base_env, mailboxes, oauth_provider):
    def snapshot():
        db.session.expire_all()
        rows = db.session.scalars(sa.select(UserEmailToken).order_by(UserEmailToken.id))
        return [
            (t.id, t.access_token_encrypted, t.refresh_token_encrypted, t.updated_at, t.status)
            for t in rows
        ]

    before, calls = snapshot(), oauth_provider.calls["token"]
    table = run_cli(base_env, "--refresh-all", "--dry-run")
    assert table.returncode == 0, table.stderr
    assert "2 tokens would be refreshed" in table.stdout
    assert "soon@example.com" in table.stdout and "expired@contoso.com" in table.stdout
    assert "later@example.com" not in table.stdout
    listed = run_cli(base_env, "--refresh-all", "--dry-run", "--json", "--days", "30")
    assert {item["id"] for item in json.loads(listed.stdout)} == {
        mailboxes["soon"],
        mailboxes["later"],
        mailboxes["expired"],
    }
    one = run_cli(base_env, "--token-id", str(mailboxes["later"]), "--dry-run", "--enqueue")
    assert one.returncode == 0 and "later@example.com" in one.stdout
    assert oauth_provider.calls["token"] == calls
    assert attempts() == []
    assert snapshot() == before


def test_token_id_refreshes_that_token_whatever_its_expiry(base_env, mailboxes, oauth_provider):
    before = token_row(mailboxes["later"]).access_token_encrypted
    result = run_cli(base_env, "--token-id", str(mailboxes["later"]), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["results"] == [
        {"id": mailboxes["later"], "outcome": "refreshed", "error": None}
    ]
    assert token_row(mailboxes["later"]).access_token_encrypted != before
    assert attempted_ids() == {mailboxes["later"]}

    missing = run_cli(base_env, "--token-id", "999999")
    assert missing.returncode == 1
    assert "no token with id 999999" in missing.stderr and missing.stdout == ""


def test_token_id_of_a_token_needing_reauth_exits_1_without_a_provider_call(
    base_env, mailboxes, oauth_provider
):
    calls = oauth_provider.calls["token"]
    result = run_cli(base_env, "--token-id", str(mailboxes["dead"]))
    assert result.returncode == 1
    assert result.stdout.startswith(
        f"token {mailboxes['dead']} (dead@yahoo.example): needs re-auth "
        "(needs_reauth: invalid_grant)\n"
    )
    assert result.stdout.strip().splitlines()[-1] == (
        "refreshed 0, skipped 0, failed 0, needs re-auth 1"
    )
    assert oauth_provider.calls["token"] == calls


def test_invalid_grant_for_one_token_exits_1_and_marks_it_needs_reauth(
    base_env, mailboxes, oauth_provider
):
    oauth_provider.fail_token_with("invalid_grant", description="Token has been revoked.")
    result = run_cli(base_env, "--refresh-all")
    assert result.returncode == 1, result.stderr
    assert result.stdout.strip().splitlines()[-1] == (
        "refreshed 1, skipped 0, failed 0, needs re-auth 1"
    )
    statuses = {token_row(mailboxes[name]).status for name in ("soon", "expired")}
    assert statuses == {"active", "needs_reauth"}
    assert sorted(a.outcome for a in attempts()) == ["permanent_error", "success"]


def test_a_provider_config_error_counts_as_failed(base_env, mailboxes, oauth_provider):
    oauth_provider.fail_token_with("invalid_client", status=401)
    result = run_cli(base_env, "--token-id", str(mailboxes["soon"]), "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["failed"] == 1 and report["refreshed"] == 0
    assert report["results"][0]["error"] == "provider_config_error: invalid_client"
    assert token_row(mailboxes["soon"]).status == "active"


def test_progress_bar_keeps_stdout_clean_for_json(base_env, connect_many, auth_headers):
    owner = auth_headers()
    ids = connect_many({f"bulk{i}": ("google", f"bulk{i}@example.com", owner) for i in range(7)})
    result = run_cli(base_env, "--refresh-all", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["refreshed"] == 7 and {r["id"] for r in report["results"]} == set(ids.values())
    assert "Refreshing" in result.stderr


def test_no_token_value_is_ever_printed(base_env, mailboxes, oauth_provider):
    def secrets() -> set[str]:
        found = set()
        for token_id in mailboxes.values():
            row = token_row(token_id)
            found.add(token_service.read_access_token(row))
            found.add(token_service.read_refresh_token(row))
            found.update({row.access_token_encrypted, row.refresh_token_encrypted})
        return found

    before = secrets()
    oauth_provider.rotation = "rotate"
    outputs = [
        run_cli(base_env, "--refresh-all", "--days", "30"),
        run_cli(base_env, "--refresh-all", "--days", "30", "--json"),
        run_cli(base_env, "--token-id", str(mailboxes["far"])),
        run_cli(base_env, "--list"),
        run_cli(base_env, "--list", "--json"),
    ]
    after = secrets()
    assert after - before  # rotated: new access and refresh tokens to look for too
    for result in outputs:
        assert result.returncode == 0, result.stderr
        for secret in before | after:
            assert secret not in result.stdout and secret not in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--refresh-all", "--days", "abc"],
        ["--refresh-all", "--days", "-1"],
        ["--refresh-all", "--provider", "hotmail"],
        ["--list", "--status", "bogus"],
        ["--list", "--refresh-all"],
        ["--token-id", "abc"],
        ["--token-id", "0"],
        ["--list", "--days", "3"],
        ["--list", "--dry-run"],
        ["--list", "--enqueue"],
        ["--token-id", "1", "--provider", "google"],
        ["--refresh-all", "--bogus"],
    ],
    ids=lambda args: " ".join(args) or "no-action",
)
def test_bad_usage_exits_2(base_env, args):
    result = run_cli(base_env, *args)
    assert result.returncode == 2
    assert "usage:" in result.stderr and result.stdout == ""


def test_enqueue_sends_forced_refresh_tasks_to_the_workers(base_env, mailboxes, oauth_provider):
    result = run_cli(base_env, "--refresh-all", "--enqueue", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["enqueued"] == 2 and report["failed"] == 0
    assert {r["id"] for r in report["results"]} == {mailboxes["soon"], mailboxes["expired"]}
    wait_for(lambda: attempted_ids() == {mailboxes["soon"], mailboxes["expired"]})
    assert {(a.outcome, a.trigger) for a in attempts()} == {("success", "task")}

    # forced: a token far from expiry is refreshed too
    one = run_cli(base_env, "--token-id", str(mailboxes["far"]), "--enqueue")
    assert one.returncode == 0 and one.stdout.strip() == "enqueued 1, failed 0"
    wait_for(lambda: mailboxes["far"] in attempted_ids())


DB_DOWN = "postgresql+psycopg://mailkey:db-pass-s3cret@127.0.0.1:9/mailkey"
REDIS_DOWN = "redis://:redis-pass-s3cret@127.0.0.1:9/0"


@pytest.mark.parametrize(
    ("override", "args", "expected"),
    [
        ({"DATABASE_URL": DB_DOWN}, ["--list"], "the database at 127.0.0.1:9/mailkey"),
        ({"DATABASE_URL": DB_DOWN}, ["--refresh-all"], "the database at 127.0.0.1:9/mailkey"),
        ({"REDIS_URL": REDIS_DOWN}, ["--refresh-all"], "Redis at 127.0.0.1:9/0 is unavailable"),
        (
            {"REDIS_URL": REDIS_DOWN},
            ["--refresh-all", "--enqueue"],
            "Redis at 127.0.0.1:9/0 is unavailable",
        ),
        (
            {"DATABASE_URL": DB_DOWN.replace("postgresql+psycopg", "postgres")},
            ["--list"],
            "error: cannot start",
        ),
    ],
    ids=["db-list", "db-refresh", "redis-refresh", "redis-enqueue", "bad-url"],
)
def test_an_unreachable_service_is_one_clear_line_and_exit_1(base_env, override, args, expected):
    result = run_cli({**base_env, **override}, *args)
    assert result.returncode == 1, result.stderr
    assert expected in result.stderr and result.stderr.startswith("error: ")
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert "s3cret" not in result.stdout + result.stderr


def test_listing_needs_no_redis(base_env, migrated_app):
    result = run_cli({**base_env, "REDIS_URL": REDIS_DOWN}, "--list", "--json")
    assert result.returncode == 0, result.stderr
    assert isinstance(json.loads(result.stdout), list)


def test_sync_cli_with_the_database_down_exits_1_without_a_traceback(base_env):
    result = subprocess.run(
        [sys.executable, "scripts/sync_accounts.py", "--all"],
        env={**os.environ, **base_env, "DATABASE_URL": DB_DOWN},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: the database at 127.0.0.1:9/mailkey is unavailable")
    assert "Traceback" not in result.stderr and "s3cret" not in result.stderr


def test_an_unconfigured_provider_fails_without_a_provider_call(
    base_env, connect_many, auth_headers, oauth_provider
):
    ids = connect_many({"g": ("google", "g@example.com", auth_headers())})
    calls = oauth_provider.calls["token"]
    result = run_cli({**base_env, "GOOGLE_CLIENT_ID": ""}, "--token-id", str(ids["g"]))
    assert result.returncode == 1, result.stderr
    assert "failed (provider_config_error: provider google is not configured: set " in (
        result.stdout
    )
    assert "GOOGLE_CLIENT_ID" in result.stdout
    assert oauth_provider.calls["token"] == calls
    token = token_row(ids["g"])
    assert token.status == "active" and token.refresh_failure_count == 0

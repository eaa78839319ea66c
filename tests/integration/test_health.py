"""Health endpoints: exact counts for one organization, nothing from another, admin only."""

from __future__ import annotations

import math
from collections import Counter
from datetime import datetime, timedelta

import pytest
from flask.testing import FlaskClient

from webapp.extensions import db
from webapp.models import MailAccount, SyncRun, TokenRefreshAttempt, UserEmailToken, utcnow
from webapp.providers import PROVIDER_NAMES
from webapp.services import health as health_service
from webapp.services.tokens import store_secrets

TOKENS_URL = "/api/v1/health/oauth-tokens"
SYNC_URL = "/api/v1/health/email-sync"
TIMELINE_URL = "/api/v1/health/timeline"
COUNT_KEYS = {
    "total",
    "active",
    "expired",
    "needs_reauth",
    "revoked",
    "expiring_soon",
    "refresh_attempts_24h",
    "refresh_failures_24h",
    "refresh_success_rate_24h",
}


@pytest.fixture(autouse=True)
def live_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    """No snapshots unless a test asks: a loaded test machine must not make counts stale."""
    monkeypatch.setattr(health_service, "SNAPSHOT_WHEN_SLOWER_THAN", 60.0)


# --- seeding ------------------------------------------------------------------------------


def add_token(
    org: int,
    user: int,
    provider: str,
    *,
    status: str = "active",
    expires_in: timedelta | None = timedelta(hours=1),
    now: datetime,
) -> UserEmailToken:
    token = UserEmailToken(
        organization_id=org,
        user_id=user,
        provider=provider,
        email_address=f"u{user}-{provider}-{org}-{status}@example.com",
        scopes="openid email",
        status=status,
        expires_at=None if expires_in is None else now + expires_in,
    )
    store_secrets(token, f"access-{user}-{provider}", f"refresh-{user}-{provider}")
    if status == "revoked":
        token.access_token_encrypted = token.refresh_token_encrypted = None
        token.revoked_at = now
    db.session.add(token)
    db.session.flush()
    return token


def add_attempt(token: UserEmailToken, outcome: str, ago: timedelta, now: datetime) -> None:
    db.session.add(
        TokenRefreshAttempt(
            token_id=token.id,
            organization_id=token.organization_id,
            provider=token.provider,
            started_at=now - ago,
            finished_at=now - ago + timedelta(seconds=1),
            outcome=outcome,
            duration_ms=1000,
            trigger="beat",
        )
    )


def add_account(org: int, user: int, status: str) -> MailAccount:
    account = MailAccount(
        organization_id=org,
        user_id=user,
        email_address=f"box{user}-{status}-{org}@example.com",
        provider="custom",
        incoming_auth_method="password",
        incoming_server="imap.example.com",
        incoming_port=993,
        status=status,
    )
    db.session.add(account)
    db.session.flush()
    return account


def add_run(
    account: MailAccount,
    outcome: str,
    ago: timedelta,
    now: datetime,
    *,
    seconds: float | None,
    new: int = 0,
) -> SyncRun:
    started = now - ago
    run = SyncRun(
        organization_id=account.organization_id,
        account_id=account.id,
        started_at=started,
        finished_at=None if seconds is None else started + timedelta(seconds=seconds),
        outcome=outcome,
        new_count=new,
    )
    db.session.add(run)
    return run


H = timedelta(hours=1)
M = timedelta(minutes=1)

# Refresh attempts of organization 1: (provider, outcome, how long ago).
ORG1_ATTEMPTS = [
    ("google", "success", 10 * M),
    ("google", "success", 2 * H),
    ("google", "success", 5 * H),
    ("google", "transient_error", 2 * H + 10 * M),
    ("google", "permanent_error", 20 * H),
    ("google", "success", 25 * H),  # older than 24 h
    ("google", "config_error", 72 * H),  # older than 24 h
    ("microsoft", "config_error", 3 * H),
    ("microsoft", "success", 48 * H),  # older than 24 h
]
# Sync runs of organization 1: (outcome, how long ago, duration in s or None, new messages).
ORG1_RUNS = [
    ("succeeded", 2 * H, 10.0, 5),
    ("succeeded", 3 * H, 20.0, 7),
    ("failed", 4 * H, 40.0, 0),
    ("succeeded", 30 * M, 30.0, 3),
    ("running", 5 * M, None, 1),
    ("succeeded", 30 * H, 100.0, 50),  # older than 24 h
]


def seed(now: datetime) -> None:
    """Organization 1 (asserted exactly) and organization 2 (must never show up)."""
    g_soon = add_token(1, 1, "google", expires_in=2 * H, now=now)
    add_token(1, 2, "google", expires_in=30 * H, now=now)  # active, beyond 24 h
    add_token(1, 3, "google", expires_in=None, now=now)  # active, no expiry known
    add_token(1, 4, "google", expires_in=-H, now=now)  # expired
    add_token(1, 5, "google", status="needs_reauth", expires_in=H, now=now)
    add_token(1, 6, "google", status="revoked", expires_in=-48 * H, now=now)
    m_soon = add_token(1, 1, "microsoft", expires_in=10 * M, now=now)
    add_token(1, 2, "microsoft", expires_in=-5 * 24 * H, now=now)  # expired
    add_token(1, 3, "microsoft", status="needs_reauth", expires_in=-H, now=now)
    by_provider = {"google": g_soon, "microsoft": m_soon}
    for provider, outcome, ago in ORG1_ATTEMPTS:
        add_attempt(by_provider[provider], outcome, ago, now)

    other = [
        add_token(2, 1, "google", expires_in=M, now=now),
        add_token(2, 2, "google", expires_in=-H, now=now),
        add_token(2, 3, "microsoft", status="revoked", now=now),
        add_token(2, 4, "yahoo", expires_in=3 * H, now=now),
        add_token(2, 5, "yahoo", status="needs_reauth", now=now),
    ]
    for token in other:
        for outcome in ("success", "transient_error", "permanent_error"):
            add_attempt(token, outcome, 30 * M, now)

    accounts = [add_account(1, n, s) for n, s in enumerate(["active", "active", "error", "paused"])]
    for outcome, ago, seconds, new in ORG1_RUNS:
        add_run(accounts[0], outcome, ago, now, seconds=seconds, new=new)

    foreign = [add_account(2, n, s) for n, s in enumerate(["active", "error", "error", "paused"])]
    add_run(foreign[0], "succeeded", H, now, seconds=500.0, new=1000)
    add_run(foreign[1], "failed", 2 * H, now, seconds=900.0)
    add_run(foreign[2], "running", M, now, seconds=None, new=7)
    db.session.commit()


@pytest.fixture
def seeded(client: FlaskClient) -> datetime:
    now = utcnow()
    seed(now)
    return now


def admin(auth_headers, org: int = 1) -> dict[str, str]:
    return auth_headers(user_id=99, org_id=org, admin=True)


def zero_counts() -> dict:
    return dict.fromkeys(COUNT_KEYS - {"refresh_success_rate_24h"}, 0) | {
        "refresh_success_rate_24h": None
    }


# --- /oauth-tokens ------------------------------------------------------------------------


def test_token_health_counts_every_key_for_the_callers_organization(client, auth_headers, seeded):
    response = client.get(TOKENS_URL, headers=admin(auth_headers))
    assert response.status_code == 200, response.json
    body = response.json
    assert set(body) == COUNT_KEYS | {"expiring_soon_window_hours", "by_provider", "generated_at"}
    assert body["by_provider"] == {
        "google": {
            "total": 6,
            "active": 3,
            "expired": 1,
            "needs_reauth": 1,
            "revoked": 1,
            "expiring_soon": 1,
            "refresh_attempts_24h": 5,
            "refresh_failures_24h": 2,
            "refresh_success_rate_24h": 0.6,
        },
        "microsoft": {
            "total": 3,
            "active": 1,
            "expired": 1,
            "needs_reauth": 1,
            "revoked": 0,
            "expiring_soon": 1,
            "refresh_attempts_24h": 1,
            "refresh_failures_24h": 1,
            "refresh_success_rate_24h": 0.0,
        },
        "yahoo": zero_counts(),
    }
    assert {key: body[key] for key in COUNT_KEYS} == {
        "total": 9,
        "active": 4,
        "expired": 2,
        "needs_reauth": 2,
        "revoked": 1,
        "expiring_soon": 2,
        "refresh_attempts_24h": 6,
        "refresh_failures_24h": 3,
        "refresh_success_rate_24h": 0.5,
    }
    assert body["expiring_soon_window_hours"] == 24
    generated = datetime.fromisoformat(body["generated_at"])
    assert body["generated_at"].endswith("Z")
    assert abs(generated - utcnow()) < timedelta(minutes=1)


def test_token_health_lists_every_registry_provider(client, auth_headers, seeded):
    body = client.get(TOKENS_URL, headers=admin(auth_headers)).json
    assert set(body["by_provider"]) == set(PROVIDER_NAMES)
    for counts in body["by_provider"].values():
        assert set(counts) == COUNT_KEYS


def test_token_health_of_another_organization_sees_only_its_own_rows(client, auth_headers, seeded):
    body = client.get(TOKENS_URL, headers=admin(auth_headers, org=2)).json
    assert {key: body[key] for key in COUNT_KEYS} == {
        "total": 5,
        "active": 2,
        "expired": 1,
        "needs_reauth": 1,
        "revoked": 1,
        "expiring_soon": 2,
        "refresh_attempts_24h": 15,
        "refresh_failures_24h": 10,
        "refresh_success_rate_24h": pytest.approx(1 / 3),
    }


@pytest.mark.parametrize(
    ("within_hours", "google", "microsoft"), [(1, 0, 1), (3, 1, 1), (48, 2, 1)]
)
def test_expiring_soon_follows_within_hours(
    client, auth_headers, seeded, within_hours, google, microsoft
):
    response = client.get(
        TOKENS_URL, query_string={"within_hours": within_hours}, headers=admin(auth_headers)
    )
    assert response.status_code == 200, response.json
    body = response.json
    assert body["expiring_soon_window_hours"] == within_hours
    assert body["by_provider"]["google"]["expiring_soon"] == google
    assert body["by_provider"]["microsoft"]["expiring_soon"] == microsoft
    assert body["expiring_soon"] == google + microsoft


def test_rates_are_null_when_nothing_was_attempted(client, auth_headers, seeded):
    now = utcnow()
    add_token(3, 1, "google", now=now)
    add_account(3, 1, "active")
    db.session.commit()
    tokens = client.get(TOKENS_URL, headers=admin(auth_headers, org=3)).json
    assert tokens["refresh_attempts_24h"] == 0
    assert tokens["refresh_success_rate_24h"] is None
    assert tokens["total"] == tokens["active"] == 1
    assert all(c["refresh_success_rate_24h"] is None for c in tokens["by_provider"].values())
    sync = client.get(SYNC_URL, headers=admin(auth_headers, org=3)).json
    assert sync["success_rate_24h"] is None
    assert sync["avg_duration_seconds"] is None
    assert sync["p95_duration_seconds"] is None
    assert sync["messages_synced_24h"] == 0
    assert sync["accounts"] == {"total": 1, "active": 1, "error": 0, "paused": 0}
    assert sync["sync_runs_24h"] == {"total": 0, "succeeded": 0, "failed": 0}


def test_empty_organization_answers_zeros(client, auth_headers):
    body = client.get(TOKENS_URL, headers=admin(auth_headers, org=7)).json
    assert {key: body[key] for key in COUNT_KEYS} == zero_counts()
    assert body["by_provider"] == {name: zero_counts() for name in PROVIDER_NAMES}


@pytest.mark.parametrize("value", ["abc", "0", "721", "-1", "1.5"])
def test_bad_within_hours_is_a_validation_error(client, auth_headers, value):
    response = client.get(f"{TOKENS_URL}?within_hours={value}", headers=admin(auth_headers))
    assert response.status_code == 422
    error = response.json["error"]
    assert error["code"] == "validation_error"
    assert "within_hours" in error["fields"]


@pytest.mark.parametrize("url", [TOKENS_URL, SYNC_URL, TIMELINE_URL])
def test_health_needs_the_admin_role(client, auth_headers, url):
    response = client.get(url, headers=auth_headers(user_id=1, org_id=1))
    assert response.status_code == 403
    assert response.json["error"]["code"] == "forbidden"


@pytest.mark.parametrize("url", [TOKENS_URL, SYNC_URL, TIMELINE_URL])
def test_health_without_a_token_is_unauthorized(client, url):
    response = client.get(url)
    assert response.status_code == 401
    assert response.json["error"]["code"] == "unauthorized"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


# --- /email-sync --------------------------------------------------------------------------


def percentile_cont(values: list[float], fraction: float) -> float:
    """PostgreSQL's percentile_cont: linear interpolation between the closest ranks."""
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def test_email_sync_health_counts_runs_of_the_last_24_hours(client, auth_headers, seeded):
    response = client.get(SYNC_URL, headers=admin(auth_headers))
    assert response.status_code == 200, response.json
    body = response.json
    assert set(body) == {
        "accounts",
        "sync_runs_24h",
        "success_rate_24h",
        "avg_duration_seconds",
        "p95_duration_seconds",
        "messages_synced_24h",
        "generated_at",
    }
    assert body["accounts"] == {"total": 4, "active": 2, "error": 1, "paused": 1}
    assert body["sync_runs_24h"] == {"total": 5, "succeeded": 3, "failed": 1}
    assert body["success_rate_24h"] == 0.75  # the running run is not in the rate
    assert body["avg_duration_seconds"] == pytest.approx(25.0)
    assert body["p95_duration_seconds"] == pytest.approx(percentile_cont([10, 20, 30, 40], 0.95))
    assert body["p95_duration_seconds"] == pytest.approx(38.5)
    assert body["messages_synced_24h"] == 16
    assert body["generated_at"].endswith("Z")


def test_email_sync_health_of_another_organization(client, auth_headers, seeded):
    body = client.get(SYNC_URL, headers=admin(auth_headers, org=2)).json
    assert body["accounts"] == {"total": 4, "active": 1, "error": 2, "paused": 1}
    assert body["sync_runs_24h"] == {"total": 3, "succeeded": 1, "failed": 1}
    assert body["success_rate_24h"] == 0.5
    assert body["avg_duration_seconds"] == pytest.approx(700.0)
    assert body["messages_synced_24h"] == 1007


# --- /timeline ----------------------------------------------------------------------------


def hour_of(moment: datetime) -> datetime:
    return moment.replace(minute=0, second=0, microsecond=0)


def test_timeline_has_one_bucket_per_hour_with_outcome_counts(client, auth_headers, seeded):
    response = client.get(TIMELINE_URL, headers=admin(auth_headers))
    assert response.status_code == 200, response.json
    buckets = response.json["buckets"]
    assert len(buckets) == 24
    starts = [datetime.fromisoformat(b["start"]) for b in buckets]
    assert all(b["start"].endswith("Z") for b in buckets)
    assert starts == [starts[0] + n * H for n in range(24)]
    assert starts[-1] in {hour_of(seeded), hour_of(utcnow())}

    refresh = Counter(
        (hour_of(seeded - ago), outcome)
        for _, outcome, ago in ORG1_ATTEMPTS
        if hour_of(seeded - ago) >= starts[0]
    )
    sync = Counter(
        (hour_of(seeded - ago), outcome)
        for outcome, ago, _, _ in ORG1_RUNS
        if hour_of(seeded - ago) >= starts[0]
    )
    for start, bucket in zip(starts, buckets, strict=True):
        assert bucket["refresh"] == {o: n for (s, o), n in refresh.items() if s == start}
        assert bucket["sync"] == {o: n for (s, o), n in sync.items() if s == start}
    assert sum(sum(b["refresh"].values()) for b in buckets) == 6  # org 2's 15 never count
    assert sum(sum(b["sync"].values()) for b in buckets) == 5
    assert sum(1 for b in buckets if not b["refresh"] and not b["sync"]) >= 17


def test_timeline_hours_sets_the_number_of_buckets(client, auth_headers, seeded):
    body = client.get(TIMELINE_URL, query_string={"hours": 1}, headers=admin(auth_headers)).json
    assert len(body["buckets"]) == 1
    body = client.get(TIMELINE_URL, query_string={"hours": 168}, headers=admin(auth_headers)).json
    assert len(body["buckets"]) == 168
    assert sum(sum(b["refresh"].values()) for b in body["buckets"]) == len(ORG1_ATTEMPTS)


@pytest.mark.parametrize("value", ["0", "169", "x"])
def test_bad_timeline_hours_is_a_validation_error(client, auth_headers, value):
    response = client.get(f"{TIMELINE_URL}?hours={value}", headers=admin(auth_headers))
    assert response.status_code == 422
    assert "hours" in response.json["error"]["fields"]


# --- snapshots of slow computations --------------------------------------------------------


def test_figures_computed_faster_than_the_threshold_are_live(client, auth_headers, seeded):
    assert client.get(TOKENS_URL, headers=admin(auth_headers)).json["total"] == 9
    add_token(1, 50, "yahoo", now=utcnow())
    db.session.commit()
    assert client.get(TOKENS_URL, headers=admin(auth_headers)).json["total"] == 10


def test_slow_figures_are_served_from_a_snapshot(client, auth_headers, seeded, monkeypatch):
    monkeypatch.setattr(health_service, "SNAPSHOT_WHEN_SLOWER_THAN", 0)
    monkeypatch.setattr(health_service, "SNAPSHOT_MIN_ROWS", 1)
    urls = (TOKENS_URL, SYNC_URL, f"{TIMELINE_URL}?hours=3")
    first = {url: client.get(url, headers=admin(auth_headers)).json for url in urls}
    add_token(1, 50, "yahoo", now=utcnow())
    add_run(add_account(1, 50, "error"), "failed", M, utcnow(), seconds=1.0)
    db.session.commit()
    for url in urls:
        assert client.get(url, headers=admin(auth_headers)).json == first[url]
    assert client.get(TOKENS_URL, headers=admin(auth_headers, org=2)).json["total"] == 5
    other_window = client.get(
        TOKENS_URL, query_string={"within_hours": 2}, headers=admin(auth_headers)
    )
    assert other_window.json["total"] == 10


def test_slow_figures_of_a_small_organization_stay_live(client, auth_headers, seeded, monkeypatch):
    """A slow computation over a few rows (a cold connection, a loaded test machine) is a
    hiccup: caching it would show a small installation 30 s old figures."""
    monkeypatch.setattr(health_service, "SNAPSHOT_WHEN_SLOWER_THAN", 0)
    urls = (TOKENS_URL, SYNC_URL, f"{TIMELINE_URL}?hours=3")
    for url in urls:
        assert client.get(url, headers=admin(auth_headers)).status_code == 200
    add_token(1, 50, "yahoo", now=utcnow())
    add_run(add_account(1, 50, "error"), "failed", M, utcnow(), seconds=1.0)
    db.session.commit()
    tokens = client.get(TOKENS_URL, headers=admin(auth_headers)).json
    assert tokens["total"] == 10
    sync = client.get(SYNC_URL, headers=admin(auth_headers)).json
    assert sync["accounts"]["error"] == 2
    assert sync["sync_runs_24h"] == {"total": 6, "succeeded": 3, "failed": 2}
    timeline = client.get(TIMELINE_URL, query_string={"hours": 3}, headers=admin(auth_headers))
    assert sum(b["sync"].get("failed", 0) for b in timeline.json["buckets"]) == 1


# --- SQLite (development) -----------------------------------------------------------------


def test_sqlite_computes_the_same_figures_with_a_nearest_rank_p95(sqlite_app):
    now = utcnow()
    seed(now)
    tokens = health_service.compute_oauth_token_health(1)
    assert (tokens["total"], tokens["active"], tokens["expired"]) == (9, 4, 2)
    assert (tokens["needs_reauth"], tokens["revoked"], tokens["expiring_soon"]) == (2, 1, 2)
    assert (tokens["refresh_attempts_24h"], tokens["refresh_failures_24h"]) == (6, 3)
    sync = health_service.compute_email_sync_health(1)
    assert sync["sync_runs_24h"] == {"total": 5, "succeeded": 3, "failed": 1}
    assert sync["avg_duration_seconds"] == pytest.approx(25.0, abs=0.01)
    assert sync["p95_duration_seconds"] == pytest.approx(40.0, abs=0.01)  # nearest rank
    assert sync["messages_synced_24h"] == 16
    buckets = health_service.compute_timeline(1, hours=168)["buckets"]
    assert len(buckets) == 168
    assert buckets[-1]["start"].tzinfo is not None
    assert sum(sum(b["refresh"].values()) for b in buckets) == len(ORG1_ATTEMPTS)
    assert sum(sum(b["sync"].values()) for b in buckets) == len(ORG1_RUNS)

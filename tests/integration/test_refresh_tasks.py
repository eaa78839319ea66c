"""Refresh tasks on a real Celery worker against real Redis and the local provider."""

from __future__ import annotations

import itertools
import threading
import time
from datetime import timedelta

import pytest
import sqlalchemy as sa

from tasks import refresh as refresh_tasks
from tests.integration.conftest import wait_runs
from tests.support.flows import connect
from tests.support.oauth_provider import ScriptedResponse
from webapp.extensions import db, redis_store
from webapp.models import TokenRefreshAttempt, UserEmailToken, utcnow

pytestmark = pytest.mark.usefixtures("celery_worker")


def _connect_many(client, headers, oauth_provider, count: int) -> list[int]:
    """Connected tokens whose initial syncs have finished (they use the tokens too)."""
    answers = [
        connect(client, headers, "google", oauth_provider, f"t{i}@example.com").json
        for i in range(count)
    ]
    for answer in answers:
        wait_runs(answer["account_id"], 1)
    return [answer["id"] for answer in answers]


def _attempts(token_id: int) -> list[TokenRefreshAttempt]:
    db.session.expire_all()
    return list(
        db.session.scalars(
            sa.select(TokenRefreshAttempt)
            .where(TokenRefreshAttempt.token_id == token_id)
            .order_by(TokenRefreshAttempt.started_at)
        )
    )


def _wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def test_task_retries_transient_errors_after_2_4_8_seconds(client, auth_headers, oauth_provider):
    token_id = _connect_many(client, auth_headers(), oauth_provider, 1)[0]
    oauth_provider.script("token", *[ScriptedResponse(status=503, body="down")] * 4)
    result = refresh_tasks.refresh_token.delay(token_id, True)
    outcome = result.get(timeout=40)
    assert outcome["outcome"] == "transient_error"
    attempts = _attempts(token_id)
    assert [a.outcome for a in attempts] == ["transient_error"] * 4
    gaps = [(b.started_at - a.started_at).total_seconds() for a, b in itertools.pairwise(attempts)]
    for gap, expected in zip(gaps, (2, 4, 8), strict=True):
        assert expected - 0.2 <= gap <= expected + 1.5, gaps
    token = db.session.get(UserEmailToken, token_id)
    assert token.status == "active" and token.refresh_failure_count == 4


def test_task_waits_for_a_longer_retry_after(client, auth_headers, oauth_provider):
    token_id = _connect_many(client, auth_headers(), oauth_provider, 1)[0]
    oauth_provider.script(
        "token",
        ScriptedResponse(
            status=429, json={"error": "temporarily_unavailable"}, headers={"Retry-After": "4"}
        ),
    )
    outcome = refresh_tasks.refresh_token.delay(token_id, True).get(timeout=30)
    assert outcome["outcome"] == "refreshed"
    first, second = _attempts(token_id)
    assert (second.started_at - first.started_at).total_seconds() >= 3.8
    assert second.outcome == "success"


def test_task_does_not_retry_a_dead_grant(client, auth_headers, oauth_provider):
    token_id = _connect_many(client, auth_headers(), oauth_provider, 1)[0]
    oauth_provider.fail_token_with("invalid_grant")
    outcome = refresh_tasks.refresh_token.delay(token_id, True).get(timeout=20)
    assert outcome["outcome"] == "needs_reauth"
    time.sleep(2.5)
    assert len(_attempts(token_id)) == 1


def test_rerun_of_a_finished_refresh_changes_nothing(client, auth_headers, oauth_provider):
    token_id = _connect_many(client, auth_headers(), oauth_provider, 1)[0]
    db.session.execute(sa.update(UserEmailToken).values(expires_at=utcnow() + timedelta(minutes=1)))
    db.session.commit()
    assert refresh_tasks.refresh_token.delay(token_id).get(timeout=20)["outcome"] == "refreshed"
    assert refresh_tasks.refresh_token.delay(token_id).get(timeout=20)["outcome"] == "skipped"
    assert len(_attempts(token_id)) == 1


def test_fanout_enqueues_each_due_token_once_even_when_run_twice_at_once(
    app, client, auth_headers, oauth_provider
):
    ids = _connect_many(client, auth_headers(), oauth_provider, 6)
    due, fresh = ids[:4], ids[4:]
    db.session.execute(
        sa.update(UserEmailToken)
        .where(UserEmailToken.id.in_(due))
        .values(expires_at=utcnow() + timedelta(minutes=3))
    )
    db.session.execute(
        sa.update(UserEmailToken)
        .where(UserEmailToken.id == due[0])
        .values(expires_at=utcnow() - timedelta(hours=2))
    )
    db.session.commit()
    calls_before = oauth_provider.calls["token"]
    counts: list[int] = []
    barrier = threading.Barrier(2)

    def run_beat() -> None:
        with app.app_context():
            barrier.wait()
            counts.append(refresh_tasks.refresh_expiring_tokens())

    threads = [threading.Thread(target=run_beat) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(counts) == [0, 4] or sum(counts) == 4
    _wait_for(lambda: all(len(_attempts(t)) == 1 for t in due))
    time.sleep(1)
    assert oauth_provider.calls["token"] == calls_before + 4
    assert all(len(_attempts(t)) == 0 for t in fresh)
    _wait_for(
        lambda: not any(redis_store.client.exists(refresh_tasks.QUEUED_KEY.format(t)) for t in due)
    )


def test_token_lost_with_a_killed_worker_is_refreshed_on_a_later_round(
    client, auth_headers, oauth_provider
):
    token_id = _connect_many(client, auth_headers(), oauth_provider, 1)[0]
    db.session.execute(sa.update(UserEmailToken).values(expires_at=utcnow() + timedelta(minutes=2)))
    db.session.commit()
    # A fan-out claimed the token, then the worker holding its task died: the marker stays.
    marker = refresh_tasks.QUEUED_KEY.format(token_id)
    redis_store.client.set(marker, "1", ex=refresh_tasks.QUEUED_TTL)
    assert refresh_tasks.refresh_expiring_tokens() == 0
    assert 0 < redis_store.client.ttl(marker) <= refresh_tasks.QUEUED_TTL
    redis_store.client.pexpire(marker, 1)  # the marker runs out by itself
    time.sleep(0.05)
    assert refresh_tasks.refresh_expiring_tokens() == 1
    _wait_for(lambda: len(_attempts(token_id)) == 1)


def test_keep_alive_picks_idle_tokens_only(client, auth_headers, oauth_provider):
    idle, used, refreshed = _connect_many(client, auth_headers(), oauth_provider, 3)
    long_ago = utcnow() - timedelta(days=40)
    db.session.execute(
        sa.update(UserEmailToken).values(
            last_used_at=long_ago, last_refreshed_at=long_ago, created_at=long_ago
        )
    )
    db.session.execute(
        sa.update(UserEmailToken).where(UserEmailToken.id == used).values(last_used_at=utcnow())
    )
    db.session.execute(
        sa.update(UserEmailToken)
        .where(UserEmailToken.id == refreshed)
        .values(last_refreshed_at=utcnow())
    )
    db.session.commit()
    assert refresh_tasks.keep_tokens_alive() == 1
    _wait_for(lambda: len(_attempts(idle)) == 1)
    assert _attempts(used) == [] and _attempts(refreshed) == []


def test_fanout_batch_hands_a_transient_failure_to_the_retrying_task(
    client, auth_headers, oauth_provider
):
    token_id = _connect_many(client, auth_headers(), oauth_provider, 1)[0]
    db.session.execute(sa.update(UserEmailToken).values(expires_at=utcnow() + timedelta(minutes=1)))
    db.session.commit()
    oauth_provider.script(
        "token",
        ScriptedResponse(status=502, body="bad gateway"),
        ScriptedResponse(status=503, body="down"),
    )
    assert refresh_tasks.refresh_expiring_tokens() == 1
    _wait_for(lambda: len(_attempts(token_id)) == 3)
    first, second, third = _attempts(token_id)
    assert [first.outcome, second.outcome, third.outcome] == [
        "transient_error",
        "transient_error",
        "success",
    ]
    assert 1.8 <= (second.started_at - first.started_at).total_seconds() <= 3.5
    assert 3.8 <= (third.started_at - second.started_at).total_seconds() <= 5.5
    _wait_for(lambda: not redis_store.client.exists(refresh_tasks.QUEUED_KEY.format(token_id)))


def test_async_refresh_runs_on_the_worker(client, auth_headers, oauth_provider):
    token_id = _connect_many(client, auth_headers(), oauth_provider, 1)[0]
    response = client.post(
        f"/api/v1/oauth/tokens/{token_id}/refresh?async=true", headers=auth_headers()
    )
    assert response.status_code == 202 and response.json["task_id"]
    _wait_for(lambda: len(_attempts(token_id)) == 1)
    assert _attempts(token_id)[0].outcome == "success"
    client.post(f"/api/v1/oauth/tokens/{token_id}/revoke", headers=auth_headers())
    revoked = client.post(
        f"/api/v1/oauth/tokens/{token_id}/refresh?async=true", headers=auth_headers()
    )
    assert revoked.status_code == 409 and revoked.json["error"]["code"] == "token_revoked"


def test_a_forced_refresh_delivered_twice_refreshes_once(client, auth_headers, oauth_provider):
    """The broker hands a task out again when its worker died before acknowledging it;
    a forced refresh carries the time it was queued, so the second run skips."""
    token_id = _connect_many(client, auth_headers(), oauth_provider, 1)[0]
    queued_at = utcnow().isoformat()
    first = refresh_tasks.refresh_token.delay(token_id, True, queued_at).get(timeout=20)
    again = refresh_tasks.refresh_token.delay(token_id, True, queued_at).get(timeout=20)
    assert (first["outcome"], again["outcome"]) == ("refreshed", "skipped")
    assert len(_attempts(token_id)) == 1
    later = refresh_tasks.refresh_token.delay(token_id, True, utcnow().isoformat()).get(timeout=20)
    assert later["outcome"] == "refreshed" and len(_attempts(token_id)) == 2

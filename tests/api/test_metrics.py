"""/metrics: Prometheus text, loopback or METRICS_TOKEN only."""

from __future__ import annotations

from tests.conftest import make_app
from tests.support.flows import connect

REMOTE = {"REMOTE_ADDR": "203.0.113.9"}


def test_metrics_counts_refreshes_and_stored_tokens(client, auth_headers, oauth_provider):
    token_id = connect(client, auth_headers(), "google", oauth_provider, "m@example.com").json["id"]
    client.post(f"/api/v1/oauth/tokens/{token_id}/refresh", headers=auth_headers())
    body = client.get("/metrics").get_data(as_text=True)
    assert 'mailkey_token_refresh_total{outcome="success",provider="google"}' in body
    assert "mailkey_token_refresh_seconds_bucket" in body
    assert 'mailkey_tokens{provider="google",status="active"} 1.0' in body
    assert 'mailkey_accounts{status="active"} 1.0' in body


def test_metrics_hidden_from_remote_callers_without_the_token(client):
    assert client.get("/metrics", environ_base=REMOTE).status_code == 404


def test_metrics_open_to_remote_callers_with_the_token(base_env):
    app = make_app(base_env, METRICS_TOKEN="scrape-secret-123")
    with app.app_context():
        client = app.test_client()
        denied = client.get(
            "/metrics", environ_base=REMOTE, headers={"Authorization": "Bearer wrong"}
        )
        assert denied.status_code == 404
        allowed = client.get(
            "/metrics", environ_base=REMOTE, headers={"Authorization": "Bearer scrape-secret-123"}
        )
        assert allowed.status_code == 200
        assert "mailkey_tokens" in allowed.get_data(as_text=True)


def test_metrics_content_type_is_prometheus_text_with_one_charset(client):
    content_type = client.get("/metrics").headers["Content-Type"]
    assert content_type.startswith("text/plain; version=")
    assert content_type.count("charset") == 1

"""Prometheus metrics (multiprocess mode when PROMETHEUS_MULTIPROC_DIR is set).

Counters and histograms are written by whichever process does the work (gunicorn
workers, Celery worker processes); gauges of stored state (tokens, accounts) are
computed from the database at scrape time, so they are right whatever process
answers.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterator

from flask import Blueprint, Flask, Response, current_app, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from webapp.errors import NotFound

TOKEN_REFRESH_TOTAL = Counter(
    "mailkey_token_refresh_total", "Token refresh attempts", ["provider", "outcome"]
)
TOKEN_REFRESH_SECONDS = Histogram(
    "mailkey_token_refresh_seconds",
    "Token refresh duration, provider call included",
    ["provider"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
)
TASK_RETRIES_TOTAL = Counter("mailkey_task_retries_total", "Celery task retries", ["task"])
FANOUT_SIZE = Histogram(
    "mailkey_beat_fanout_size",
    "Items enqueued by one beat fan-out",
    ["task"],
    buckets=(0, 1, 10, 100, 1000, 10000, 100000),
)
SYNC_RUNS_TOTAL = Counter("mailkey_sync_runs_total", "Mailbox sync runs", ["outcome"])
SYNC_SECONDS = Histogram(
    "mailkey_sync_seconds", "Mailbox sync duration", buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 1800)
)
MESSAGES_SYNCED_TOTAL = Counter("mailkey_messages_synced_total", "New messages stored by sync")
SENDS_TOTAL = Counter("mailkey_sends_total", "Outgoing messages", ["outcome"])

blueprint = Blueprint("metrics", __name__)


class StoredStateCollector(Collector):
    """Token and account counts straight from the database, at scrape time."""

    def __init__(self, app: Flask) -> None:
        self.app = app

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from webapp.services.stats import account_status_counts, token_status_counts

        with self.app.app_context():
            tokens = GaugeMetricFamily(
                "mailkey_tokens", "Stored tokens by status", labels=["provider", "status"]
            )
            for (provider, status), count in token_status_counts().items():
                tokens.add_metric([provider, status], count)
            accounts = GaugeMetricFamily(
                "mailkey_accounts", "Mail accounts by status", labels=["status"]
            )
            for status, count in account_status_counts().items():
                accounts.add_metric([status], count)
        yield tokens
        yield accounts


def init_metrics(app: Flask) -> None:
    app.register_blueprint(blueprint)


def _allowed() -> bool:
    token = current_app.config.get("METRICS_TOKEN")
    header = request.headers.get("Authorization", "")
    if token and hmac.compare_digest(header.encode(), f"Bearer {token}".encode()):
        return True
    try:
        return ipaddress.ip_address(request.remote_addr or "").is_loopback
    except ValueError:
        return False


@blueprint.get("/metrics")
def metrics() -> Response:
    if not _allowed():
        raise NotFound()
    source = REGISTRY
    if current_app.config.get("PROMETHEUS_MULTIPROC_DIR"):
        source = CollectorRegistry()
        multiprocess.MultiProcessCollector(source)
    state = CollectorRegistry()
    state.register(StoredStateCollector(current_app._get_current_object()))  # type: ignore[attr-defined]
    body = generate_latest(source) + generate_latest(state)
    return Response(body, headers={"Content-Type": CONTENT_TYPE_LATEST})  # charset once

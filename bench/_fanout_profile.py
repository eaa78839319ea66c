"""How fast beat's fan-out can enqueue, as shipped and with cheaper publishing.

Used by bench/refresh_fleet.py when it misses its target (or with --profile), after its
workers stopped: each variant enqueues the same token ids into the bench Redis DB (flushed
before each variant, so the QUEUED markers start empty) and nobody consumes them.

- shipped:  tasks.refresh.enqueue_refreshes (SET NX pipeline, then apply_async per token);
- producer: the same apply_async calls sharing one producer (one pooled connection);
- +ignore:  and ignore_result=True (no result-channel SUBSCRIBE per task, no result key);
- +nosent:  and task_send_sent_event off (no task-sent event PUBLISH per task).
"""

from __future__ import annotations

import cProfile
from collections.abc import Callable
from typing import Any

from _common import Timer, table, top_profile
from flask import current_app

from tasks.refresh import enqueue_refreshes, refresh_token
from webapp.extensions import redis_store


def _variant(ids: list[int], rate: int, ignore: bool, no_sent: bool) -> None:
    celery = current_app.extensions["celery"]
    sent_events = celery.conf.task_send_sent_event
    celery.conf.task_send_sent_event = sent_events and not no_sent
    try:
        with celery.producer_or_acquire() as producer:
            for index, token_id in enumerate(ids):
                options: dict[str, Any] = {"ignore_result": True} if ignore else {}
                refresh_token.apply_async(
                    args=[token_id, False], countdown=index / rate, producer=producer, **options
                )
    finally:
        celery.conf.task_send_sent_event = sent_events


def profile_fanout(ids: list[int], rate: int) -> None:
    variants: list[tuple[str, Callable[[], object]]] = [
        ("shipped enqueue_refreshes", lambda: enqueue_refreshes(ids, force=False, task_name="b")),
        ("one shared producer", lambda: _variant(ids, rate, ignore=False, no_sent=False)),
        ("+ ignore_result=True", lambda: _variant(ids, rate, ignore=True, no_sent=False)),
        ("+ no task-sent event", lambda: _variant(ids, rate, ignore=True, no_sent=True)),
    ]
    rows = []
    for name, run in variants:
        redis_store.client.flushdb()
        memory = redis_store.client.info("memory")["used_memory"]
        with Timer() as t:
            run()
        grown = redis_store.client.info("memory")["used_memory"] - memory
        rows.append([name, t.seconds, len(ids) / t.seconds, 1000 * t.seconds / len(ids), grown])
    print(f"\nfan-out enqueue of {len(ids):,} tasks (no consumer running):")
    table(["variant", "s", "tasks/s", "ms/task", "Redis bytes grown"], rows)
    redis_store.client.flushdb()
    profile = cProfile.Profile()
    profile.runcall(enqueue_refreshes, ids[:500], force=False, task_name="b")
    print("\ncProfile of the shipped enqueue_refreshes over 500 tokens (top by own time):")
    top_profile(profile, 12, "tottime")
    redis_store.client.flushdb()

"""What the operator CLIs in scripts/ share: argument types, progress, output, exit codes.

Exit status everywhere: 0 when everything succeeded, 1 when anything failed, 2 on
bad usage (argparse). Only the requested output goes to stdout; logs and progress
bars go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import redis
import sqlalchemy as sa
from kombu.exceptions import OperationalError as BrokerError
from rich.console import Console
from rich.progress import Progress

from webapp.config import ConfigError
from webapp.errors import MailkeyError
from webapp.logs import redact

OK, FAILED = 0, 1
INTERRUPTED = 130
PROGRESS_THRESHOLD = 5
# A database or Redis that cannot be reached fails every item alike: stop the run.
UNAVAILABLE = (
    sa.exc.OperationalError,
    sa.exc.InterfaceError,
    redis.ConnectionError,
    redis.TimeoutError,
    BrokerError,
)


class Aborted(Exception):
    """A run stopped part way: the outcomes so far and why."""

    def __init__(self, outcomes: list[Outcome], total: int, reason: str) -> None:
        super().__init__(reason)
        self.outcomes, self.total, self.reason = outcomes, total, reason


@dataclass
class Outcome:
    id: int
    outcome: str
    error: str | None = None


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_int(text: str) -> int:
    value = non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def describe(exc: Exception) -> str:
    """A short, secret-free description of a failure."""
    if isinstance(exc, MailkeyError):
        if exc.reason == "provider_not_configured":
            return f"{exc.code}: {exc.message}"  # names the variable to set
        return f"{exc.code}: {exc.reason}" if exc.reason else exc.code
    return redact(f"{type(exc).__name__}: {exc}")[:200]


def stdout_console() -> Console:
    console = Console()
    # Piped output has no width to follow: do not wrap addresses at 80 columns.
    return console if console.is_terminal else Console(width=250)


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2) + "\n")


@contextmanager
def logs_above_progress() -> Iterator[None]:
    """On a terminal rich swaps sys.stderr for a proxy that prints above the live bar;
    point the stderr log handlers at it meanwhile so log lines do not tear the bar."""
    handlers = [
        h
        for h in logging.getLogger().handlers
        if isinstance(h, logging.StreamHandler) and h.stream is sys.__stderr__
    ]
    previous = [handler.stream for handler in handlers]
    for handler in handlers:
        handler.setStream(sys.stderr)
    try:
        yield
    finally:
        for handler, stream in zip(handlers, previous, strict=True):
            handler.setStream(stream)


def unavailable_message(exc: BaseException) -> str:
    """Which service is down, where (never with its password), and what it said."""
    from flask import current_app

    if isinstance(exc, sa.exc.DBAPIError):
        url = sa.engine.make_url(current_app.config["SQLALCHEMY_DATABASE_URI"])
        where = url.database if url.drivername.startswith("sqlite") else _where(url)
        detail = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else ""
        return redact(f"the database at {where} is unavailable: {detail or type(exc).__name__}")
    url = sa.engine.make_url(current_app.config["REDIS_URL"])
    detail = " ".join(str(exc).split()) or type(exc).__name__
    return redact(f"Redis at {_where(url)} is unavailable: {detail}")


def _where(url: sa.engine.URL) -> str:
    return f"{url.host or 'localhost'}:{url.port or ''}/{url.database or ''}".replace(":/", "/")


def check_services(*, needs_redis: bool) -> None:
    """Fail fast, before any work, when the database (or Redis, when needed) is down."""
    from webapp.extensions import db, redis_store

    db.session.execute(sa.text("SELECT 1"))
    db.session.rollback()
    if needs_redis:
        redis_store.client.ping()


def run_each(ids: list[int], work: Callable[[int], Outcome], label: str) -> list[Outcome]:
    """Run `work` on every id, with a progress bar on stderr for long runs. A database
    or Redis failure stops the run (Aborted) instead of failing every item in turn."""
    outcomes: list[Outcome] = []
    try:
        if len(ids) <= PROGRESS_THRESHOLD:
            for item in ids:
                outcomes.append(work(item))
            return outcomes
        with Progress(console=Console(stderr=True), redirect_stdout=False) as progress:
            task = progress.add_task(label, total=len(ids))
            with logs_above_progress():
                for item in ids:
                    outcomes.append(work(item))
                    progress.advance(task)
    except UNAVAILABLE as exc:
        raise Aborted(outcomes, len(ids), unavailable_message(exc)) from None
    return outcomes


def report(
    outcomes: list[Outcome],
    keys: Sequence[str],
    *,
    as_json: bool,
    noun: str,
    names: dict[int, str],
    labels: dict[str, str] | None = None,
    failing: Sequence[str] = ("failed",),
) -> int:
    """Print the per-item problems and the summary; the exit status."""
    labels = labels or {}
    counts = Counter(outcome.outcome for outcome in outcomes)
    summary = {key: counts[key] for key in keys}
    if as_json:
        print_json({**summary, "results": [asdict(outcome) for outcome in outcomes]})
    else:
        for outcome in outcomes:
            if outcome.error:
                label = labels.get(outcome.outcome, outcome.outcome)
                print(f"{noun} {outcome.id} ({names[outcome.id]}): {label} ({outcome.error})")
        print(", ".join(f"{labels.get(key, key)} {count}" for key, count in summary.items()))
    return FAILED if any(counts[key] for key in failing) else OK


def enqueue_one(task_name: str, item: int, *args: Any) -> Outcome:
    from webapp.services.queue import enqueue

    try:
        enqueue(task_name, item, *args)
    except UNAVAILABLE:
        raise
    except Exception as exc:
        raise BrokerError(describe(exc)) from exc
    return Outcome(item, "enqueued")


def work_or_enqueue(
    names: dict[int, str],
    *,
    enqueue_task: str | None,
    enqueue_args: tuple[Any, ...] = (),
    work: Callable[[int], Outcome],
    label: str,
    keys: Sequence[str],
    as_json: bool,
    noun: str,
    labels: dict[str, str] | None = None,
    failing: Sequence[str] = ("failed",),
) -> int:
    """Do the work in-process (or hand it to the workers), then report; the exit status."""
    ids = list(names)
    aborted: Aborted | None = None
    if enqueue_task:
        keys = ("enqueued", "failed")
        try:
            outcomes = run_each(
                ids, lambda item: enqueue_one(enqueue_task, item, *enqueue_args), "Enqueueing"
            )
        except Aborted as exc:
            outcomes, aborted = exc.outcomes, exc
    else:
        try:
            outcomes = run_each(ids, work, label)
        except Aborted as exc:
            outcomes, aborted = exc.outcomes, exc
    status = report(
        outcomes, keys, as_json=as_json, noun=noun, names=names, labels=labels, failing=failing
    )
    if aborted is not None:
        print(
            f"error: {aborted.reason}; stopped after {len(aborted.outcomes)} of "
            f"{aborted.total} {noun}s",
            file=sys.stderr,
        )
        return FAILED
    return status


def run_in_app(run: Callable[[], int], *, needs_redis: bool = True) -> int:
    """Build the app from the environment and run inside its context. A bad setting or
    a database or Redis that cannot be reached ends the run with one clear line on
    stderr and exit status 1: no traceback, and never a password from a URL."""
    from webapp import create_app
    from webapp.extensions import db

    try:
        app = create_app()
    except ConfigError as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return FAILED
    except Exception as exc:  # e.g. a DATABASE_URL that SQLAlchemy cannot load
        print(f"error: cannot start: {describe(exc)}", file=sys.stderr)
        return FAILED
    with app.app_context():
        try:
            check_services(needs_redis=needs_redis)
            return run()
        except UNAVAILABLE as exc:
            print(f"error: {unavailable_message(exc)}", file=sys.stderr)
            return FAILED
        except (sa.exc.SQLAlchemyError, redis.RedisError) as exc:
            hint = ""
            if isinstance(exc, sa.exc.ProgrammingError):
                hint = " (is the schema migrated? run `make migrate`)"
            detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()
            message = f"{type(exc).__name__}: {detail[0] if detail else ''}"
            print(f"error: {redact(message)}{hint}", file=sys.stderr)
            return FAILED
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return INTERRUPTED
        finally:
            try:
                db.session.remove()
            except Exception:  # noqa: S110 - a dead connection must not mask the message
                pass

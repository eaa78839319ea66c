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

from rich.console import Console
from rich.progress import Progress

from webapp.config import ConfigError
from webapp.errors import MailkeyError
from webapp.logs import redact

OK, FAILED = 0, 1
PROGRESS_THRESHOLD = 5


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


def run_each(ids: list[int], work: Callable[[int], Outcome], label: str) -> list[Outcome]:
    """Run `work` on every id, with a progress bar on stderr for long runs."""
    if len(ids) <= PROGRESS_THRESHOLD:
        return [work(item) for item in ids]
    outcomes = []
    with Progress(console=Console(stderr=True), redirect_stdout=False) as progress:
        task = progress.add_task(label, total=len(ids))
        with logs_above_progress():
            for item in ids:
                outcomes.append(work(item))
                progress.advance(task)
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
    except Exception as exc:
        return Outcome(item, "failed", describe(exc))
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
    if enqueue_task:
        outcomes = run_each(
            ids, lambda item: enqueue_one(enqueue_task, item, *enqueue_args), "Enqueueing"
        )
        keys = ("enqueued", "failed")
    else:
        outcomes = run_each(ids, work, label)
    return report(
        outcomes, keys, as_json=as_json, noun=noun, names=names, labels=labels, failing=failing
    )


def run_in_app(run: Callable[[], int]) -> int:
    """Build the app from the environment and run inside its context."""
    from webapp import create_app
    from webapp.extensions import db

    try:
        app = create_app()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return FAILED
    with app.app_context():
        try:
            return run()
        finally:
            db.session.remove()

"""Shared setup for the benchmark scripts (not a benchmark itself).

Each benchmark owns one PostgreSQL database `mailkey_bench_<name>` on 127.0.0.1:5432
(created, migrated and dropped here) and one Redis database (8-11, flushed at start).
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import redis
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from webapp.crypto import generate_keys  # noqa: E402

JWT_SECRET = "bench-jwt-secret-" + "j" * 47  # 64 characters
REDIS_DBS = (8, 9, 10, 11)


def database_url(name: str) -> str:
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/mailkey_bench_{name}"


def redis_url(db_number: int) -> str:
    if db_number not in REDIS_DBS:
        raise ValueError(f"benchmarks may only use Redis DBs {REDIS_DBS}")
    return f"redis://127.0.0.1:6379/{db_number}"


def _recreate(url: str, create: bool) -> None:
    from tests.support.database import drop_database

    name = sa.engine.make_url(url).database or ""
    if not name.startswith("mailkey_bench_"):
        raise ValueError(f"refusing to touch database {name!r}")
    drop_database(url, create=create)


def bench_env(name: str, redis_db: int, instance: str, **extra: str) -> dict[str, str]:
    """The environment of a bench app (and of any worker or CLI it starts)."""
    return {
        "MAILKEY_ENV": "test",
        "MAILKEY_INSTANCE_PATH": instance,
        "DATABASE_URL": database_url(name),
        "REDIS_URL": redis_url(redis_db),
        "API_JWT_SECRET": JWT_SECRET,
        "FLOWER_BASIC_AUTH": "bench:bench",
        "LOG_LEVEL": "WARNING",
        "OAUTH_REDIRECT_URI": "http://localhost:3000/auth/callback/{provider}",
        **generate_keys(),
        **extra,
    }


def provider_env(provider: Any) -> dict[str, str]:
    """Point every provider at the local OAuth provider (tests/support/oauth_provider.py)."""
    env: dict[str, str] = {}
    for prefix in ("GOOGLE", "MICROSOFT", "YAHOO"):
        env.update(provider.env(prefix))
    return env


@contextlib.contextmanager
def local_provider(nodelay: bool = True, **kwargs: Any) -> Iterator[Any]:
    """The local OAuth provider of the tests, running. The fixture as shipped answers every
    request ~40 ms late (headers and body are two small writes: Nagle + delayed ACK);
    `nodelay` sets TCP_NODELAY on its connections so that stall does not hide the costs
    being measured."""
    from tests.support import oauth_provider

    oauth_provider._Handler.disable_nagle_algorithm = nodelay
    kwargs.setdefault("client_secret", "bench-client-secret-" + "s" * 12)
    with oauth_provider.OAuthProvider(**kwargs) as provider:
        yield provider


@contextlib.contextmanager
def oauth2_mock_server() -> Iterator[str]:
    """oauth2-mock-server (npm, pinned in bench/oauth2-mock-server/) running in a Node
    process of its own, with the README's hooks; yields its token endpoint's URL. It is
    installed there with npm on first use."""
    import shutil
    import subprocess
    import threading

    folder = ROOT / "bench" / "oauth2-mock-server"
    if shutil.which("node") is None or shutil.which("npm") is None:
        raise SystemExit("oauth2-mock-server needs Node.js and npm on PATH (or: --provider local)")
    if not (folder / "node_modules" / "oauth2-mock-server").is_dir():
        print(f"installing oauth2-mock-server into {folder} (npm ci)", flush=True)
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=folder, check=True)
    server = subprocess.Popen(
        ["node", "server.mjs", "0"], cwd=folder, stdout=subprocess.PIPE, text=True
    )
    try:
        line = server.stdout.readline() if server.stdout else ""
        if not line.startswith("listening "):
            raise SystemExit(f"oauth2-mock-server did not start: {line!r}")
        # Whatever it prints later is drained, so a full pipe never stalls it.
        threading.Thread(target=server.communicate, daemon=True).start()
        yield line.split()[1]
    finally:
        server.terminate()
        server.wait(10)


def make_app(env: dict[str, str]) -> Any:
    from webapp import create_app
    from webapp.config import Settings

    return create_app(settings=Settings.from_env(env))


@contextlib.contextmanager
def bench_app(
    name: str, redis_db: int, extra: Callable[[str], dict[str, str]] | None = None
) -> Iterator[tuple[Any, dict[str, str]]]:
    """A fresh migrated database and an empty Redis DB; yields (app, env); drops the DB."""
    from flask_migrate import upgrade

    url = database_url(name)
    _recreate(url, create=True)
    client = redis.Redis.from_url(redis_url(redis_db))
    client.flushdb()
    try:
        with tempfile.TemporaryDirectory(prefix=f"mailkey-bench-{name}-") as instance:
            env = bench_env(name, redis_db, instance, **(extra(instance) if extra else {}))
            app = make_app(env)
            with app.app_context():
                upgrade(directory=str(ROOT / "migrations"))
            yield app, env
            with app.app_context():
                from webapp.extensions import db

                db.session.remove()
                db.engine.dispose()
    finally:
        client.flushdb()
        client.close()
        _recreate(url, create=False)


class Timer:
    def __enter__(self) -> Timer:
        self.started = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.started


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print an aligned text table (first column left, the rest right)."""
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        rest = [cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True)]
        return "  ".join([row[0].ljust(widths[0]), *rest])

    print(line(cells[0]))
    print("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        print(line(row))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def verdict(label: str, ok: bool) -> str:
    line = f"{label}: {'PASS' if ok else 'FAIL'}"
    print(line)
    return line


def top_profile(profile: Any, limit: int = 20, sort: str = "cumulative", match: str = "") -> None:
    """Print the top `limit` functions by `sort`, optionally only those whose path matches."""
    import pstats

    stats = pstats.Stats(profile)
    if match:
        stats.sort_stats(sort).print_stats(match, limit)
    else:
        stats.strip_dirs().sort_stats(sort).print_stats(limit)


@contextlib.contextmanager
def phase_timers(targets: Sequence[tuple[Any, str, str]]) -> Iterator[dict[str, list[float]]]:
    """Wrap `owner.attribute` for each (owner, attribute, label) with a timer; yields
    {label: [calls, seconds, cpu seconds of the calling thread]}. Cheap, unlike a
    profiler; nested phases overlap. Wall time includes waiting for the GIL; CPU does not."""
    import functools

    totals: dict[str, list[float]] = {label: [0, 0.0, 0.0] for _, _, label in targets}
    saved = [(owner, name, owner.__dict__[name]) for owner, name, _ in targets]

    def wrap(fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started, cpu = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                total = totals[label]
                total[0] += 1
                total[1] += time.perf_counter() - started
                total[2] += time.thread_time() - cpu

        return timed

    for owner, name, label in targets:
        setattr(owner, name, wrap(getattr(owner, name), label))
    try:
        yield totals
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def proc_stat(pid: int | str) -> tuple[str, list[str]] | None:
    """(name, the fields after it) of /proc/PID/stat; None once the process is gone.
    After the name: [11] utime, [12] stime, [13] cutime, [14] cstime, in clock ticks."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()


def cpu_by_program() -> dict[str, float]:
    """CPU seconds (user + system, plus reaped children's) used so far by each program on
    this machine, summed by name. A process that exits is counted by its parent once
    reaped (a Dovecot imap process at logout, for instance). Take two readings and
    subtract them with `cpu_delta`."""
    import os

    tick = os.sysconf("SC_CLK_TCK")
    totals: dict[str, float] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := proc_stat(entry.name)) is not None:
            name, fields = stat
            totals[name] = totals.get(name, 0.0) + sum(map(int, fields[11:15])) / tick
    return totals


def cpu_delta(before: dict[str, float], after: dict[str, float], least: float = 0.02) -> str:
    """'name 0.52 s, ...' for the programs that used at least `least` s in between."""
    # kernel worker threads are left out: here their counters run faster than the clock
    spent = {
        name: after[name] - before.get(name, 0.0)
        for name in after
        if not name.startswith(("kworker/", "ksoftirqd/"))
    }
    busy = sorted(((s, n) for n, s in spent.items() if s >= least), reverse=True)
    return ", ".join(f"{name} {seconds:.2f}" for seconds, name in busy) or "none"


@contextlib.contextmanager
def celery_workers(
    app: Any,
    env: dict[str, str],
    logdir: str,
    count: int = 1,
    pool: str = "prefork",
    concurrency: int = 1,
) -> Iterator[list[Any]]:
    """`count` real `celery -A tasks worker` subprocesses with the bench app's environment
    (so their app is built from the same database, Redis, keys and provider URLs), each in
    its own session; yields them once they all answer a ping, stops them after."""
    import os
    import signal
    import subprocess

    workers = []
    try:
        for n in range(count):
            log = open(Path(logdir) / f"worker{n}.log", "w")  # noqa: SIM115 - closed with the run
            command = [str(ROOT / ".venv/bin/celery"), "-A", "tasks", "worker", f"--pool={pool}"]
            command += ["-c", str(concurrency), "-n", f"bench{n}@%h", "--loglevel=WARNING"]
            workers.append(
                subprocess.Popen(
                    command,
                    env={**os.environ, **env},
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )  # fmt: skip
            )
        deadline = time.monotonic() + 90
        while len(app.extensions["celery"].control.ping(timeout=1.0)) < count:
            if time.monotonic() > deadline or any(w.poll() is not None for w in workers):
                log_text = (Path(logdir) / "worker0.log").read_text()
                raise RuntimeError(f"workers did not start:\n{log_text}")
        yield workers
    finally:
        for proc in workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in workers:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: only what we started
                proc.wait()

"""Where `flask keys rotate` spends its time, and what a different UPDATE would save.

Used by bench/crypto.py (`--profile`, or when rotation misses its target). Runs in-process
on the bench database; every variant rotates the same first N token rows (both ciphertext
columns) onto a fresh key, so each does the same decrypt/encrypt work:

- shipped: webapp.services.keys.rotate_column itself, one column after the other;
- orm:     a copy of its loop, timed per phase (SELECT ... FOR UPDATE, crypto, UPDATE, COMMIT);
- values:  the same loop with one `UPDATE ... FROM (VALUES ...)` per batch;
- both:    one pass per batch rewriting both columns in one `UPDATE ... FROM (VALUES ...)`;
- both+:   `both` with SET LOCAL synchronous_commit = off and batches of 2,000.
Then cProfile of the shipped rotate_column (top functions by own time).
"""

from __future__ import annotations

import cProfile
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from _common import Timer, table, top_profile
from sqlalchemy import select, text, update

from webapp.crypto import Keyring, generate_keys, init_keyring, reencrypt
from webapp.extensions import db
from webapp.models import UserEmailToken
from webapp.services.keys import COLUMNS, RotationReport, _stale, rotate_column

TOKEN_COLUMNS = COLUMNS[:2]  # access_token_encrypted, refresh_token_encrypted
PHASES = ("select", "crypto", "update", "commit")


def _rotate_to_fresh_key(keys: list[dict[str, str]]) -> None:
    """Make a new key current; every key used so far stays as a previous key."""
    keys.insert(0, generate_keys())
    values = {var: keys[0][var] for var in keys[0]}
    values |= {f"{var}_PREVIOUS": ",".join(k[var] for k in keys[1:]) for var in keys[0]}
    init_keyring(Keyring.from_settings(values))


def _values_update(fresh: dict[str, list[str]], ids: list[int]) -> None:
    names = list(fresh)
    row = "(" + ", ".join(["%s::int"] + ["%s"] * len(names)) + ")"
    params: list[Any] = []
    for index, row_id in enumerate(ids):
        params += [row_id, *(fresh[name][index] for name in names)]
    sets = ", ".join(f"{name} = v.{name}" for name in names)
    sql = (
        f"UPDATE user_email_tokens AS t SET {sets}, updated_at = now() "
        f"FROM (VALUES {', '.join([row] * len(ids))}) AS v(id, {', '.join(names)}) "
        "WHERE t.id = v.id"
    )
    db.session.connection().exec_driver_sql(sql, tuple(params))


def _loop(
    specs: tuple[Any, ...], rows: int, batch: int, values: bool = True, async_commit: bool = False
) -> dict[str, float]:
    """rotate_column's loop over `rows` rows, for one or several columns per pass."""
    phases: dict[str, float] = defaultdict(float)
    last_id, done = 0, 0
    while done < rows:
        clock = time.perf_counter()
        if async_commit:
            db.session.execute(text("SET LOCAL synchronous_commit = off"))
        stale = _stale(specs[0])
        for spec in specs[1:]:
            stale = stale | _stale(spec)
        query = (
            select(UserEmailToken.id, *(s.column for s in specs), *specs[0].aad_columns)
            .where(stale, UserEmailToken.id > last_id)
            .order_by(UserEmailToken.id)
            .limit(min(batch, rows - done))
            .with_for_update(of=UserEmailToken)
        )
        result = db.session.execute(query).all()
        phases["select"] += time.perf_counter() - clock
        if not result:
            db.session.rollback()
            break
        clock = time.perf_counter()
        fresh = {
            s.column.key: [reencrypt(r[1 + i], s.key_id, s.aad(r)) for r in result]
            for i, s in enumerate(specs)
        }
        ids = [r.id for r in result]
        phases["crypto"] += time.perf_counter() - clock
        clock = time.perf_counter()
        if not values:
            (key, column), *_ = fresh.items()
            changes = [{"id": i, key: v} for i, v in zip(ids, column, strict=True)]
            db.session.execute(update(UserEmailToken), changes)
        else:
            _values_update(fresh, ids)
        phases["update"] += time.perf_counter() - clock
        clock = time.perf_counter()
        db.session.commit()
        phases["commit"] += time.perf_counter() - clock
        last_id, done = ids[-1], done + len(ids)
    return phases


def _shipped(rows: int, batch: int) -> dict[str, float]:
    for spec in TOKEN_COLUMNS:
        handled = 0
        for count in rotate_column(spec, RotationReport(), batch, dry_run=False):
            handled += count
            if handled >= rows:
                break
    return {}


def _per_column(rows: int, batch: int, values: bool) -> dict[str, float]:
    first, second = (_loop((spec,), rows, batch, values) for spec in TOKEN_COLUMNS)
    return {phase: first[phase] + second[phase] for phase in PHASES}


def profile_rotation(env: dict[str, str], current: dict[str, str], batch: int, rows: int) -> None:
    keys = [current, {name: env[name] for name in current}]
    variants: list[tuple[str, Callable[[], dict[str, float]]]] = [
        ("shipped rotate_column, per column", lambda: _shipped(rows, batch)),
        ("orm: ORM bulk UPDATE by pk, per column", lambda: _per_column(rows, batch, False)),
        ("values: UPDATE FROM VALUES, per column", lambda: _per_column(rows, batch, True)),
        ("both: 2 columns in 1 UPDATE FROM VALUES", lambda: _loop(TOKEN_COLUMNS, rows, batch)),
        ("both+: async commit, batch 2000", lambda: _loop(TOKEN_COLUMNS, rows, 2000, True, True)),
    ]  # fmt: skip
    results = []
    for name, run in variants:
        _rotate_to_fresh_key(keys)
        with Timer() as t:
            phases = run()
        results.append([name, t.seconds, rows / t.seconds, *(phases.get(p, "") for p in PHASES)])
    print(f"\nrotation profile: {rows:,} token rows x 2 columns per variant (batch {batch})")
    table(["variant", "s", "rows/s", *(f"{p} s" for p in PHASES)], results)

    _rotate_to_fresh_key(keys)
    profile = cProfile.Profile()
    profile.runcall(_shipped, rows // 4, batch)
    print(f"\ncProfile of the shipped rotate_column over {rows // 4:,} rows x 2 columns:")
    top_profile(profile, 12, "tottime")

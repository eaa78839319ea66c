"""scripts/sync_accounts.py as an operator runs it, against Dovecot and the test database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import wait_runs

ROOT = Path(__file__).resolve().parents[2]


def _cli(base_env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "scripts/sync_accounts.py", *args],
        env={**os.environ, **base_env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_account_id_syncs_in_process(base_env, mailbox, mail):
    mail.imap.seed(mailbox["address"], "INBOX", 3)
    result = _cli(base_env, "--account-id", str(mailbox["account_id"]))
    assert result.returncode == 0, result.stderr
    assert "synced 1, skipped 0, failed 0" in result.stdout
    runs = wait_runs(mailbox["account_id"], 2)
    assert runs[-1].new_count == 3


def test_all_dry_run_lists_and_changes_nothing(base_env, mailbox):
    result = _cli(base_env, "--all", "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    assert [a["id"] for a in listed] == [mailbox["account_id"]]
    assert len(wait_runs(mailbox["account_id"], 1)) == 1


def test_user_id_enqueues_to_the_workers(base_env, mailbox):
    result = _cli(base_env, "--user-id", "1", "--org-id", "1", "--enqueue", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["enqueued"] == 1
    assert wait_runs(mailbox["account_id"], 2)[-1].outcome == "succeeded"


def test_a_failed_sync_exits_1(base_env, mailbox, oauth_provider):
    oauth_provider.revoke_grant_for(mailbox["address"])
    result = _cli(base_env, "--account-id", str(mailbox["account_id"]))
    assert result.returncode == 1
    assert "failed 1" in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--account-id", "abc"],
        ["--all", "--account-id", "1"],
        ["--org-id", "1", "--all"],
        ["--all", "--dry-run", "--enqueue"],
        ["--bogus"],
    ],
)
def test_bad_usage_exits_2(base_env, args):
    result = _cli(base_env, *args)
    assert result.returncode == 2
    assert "usage:" in result.stderr


def test_unknown_account_exits_1(base_env, app):
    result = _cli(base_env, "--account-id", "424242")
    assert result.returncode == 1
    assert "no account with id 424242" in result.stderr

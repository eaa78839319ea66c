"""The web console end to end: headless Chromium against the app over real HTTP.

The app runs in a werkzeug server thread on a free loopback port, with
OAUTH_REDIRECT_URI pointing at the console's own completion page, so a click on
"Connect Google" really travels browser -> local OAuth provider -> 302 back to
/console/oauth/complete -> callback. A missing Chromium skips these tests loudly on
a developer machine and fails them with CI=true.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.serving import WSGIRequestHandler, make_server

from tests.conftest import make_app, missing_service
from tests.support.oauth_provider import OAuthProvider
from webapp import create_app
from webapp.config import Settings
from webapp.console import CONSOLE_CSP
from webapp.extensions import db
from webapp.models import MailAccount, MailFolder, MailMessage, SyncRun, UserEmailToken, utcnow

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "console-mailboxes.png"
WAIT_SECONDS = 20
PAGE_BUDGET_BYTES = 200_000
XSS_SUBJECT = '<script>window.__xss=1</script><img src=x onerror="window.__xss=2">'


# --- the app over real HTTP ---------------------------------------------------------------


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, *args: Any, **kwargs: Any) -> None:
        """No access log: the callback's query string carries the code and state."""


@dataclass
class Console:
    app: Flask
    base_url: str

    def url(self, path: str) -> str:
        return self.base_url + path


@pytest.fixture(scope="module")
def console_server(migrated_app: Flask, base_env: dict[str, str]) -> Iterator[Console]:
    holder: dict[str, Flask] = {}

    def dispatch(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        return holder["app"](environ, start_response)

    server = make_server("127.0.0.1", 0, dispatch, threaded=True, request_handler=_QuietHandler)
    base_url = f"http://127.0.0.1:{server.server_port}"
    holder["app"] = make_app(base_env, OAUTH_REDIRECT_URI=f"{base_url}/console/oauth/complete")
    thread = threading.Thread(target=server.serve_forever, name="console-http", daemon=True)
    thread.start()
    try:
        yield Console(holder["app"], base_url)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def console(console_server: Console, app: Flask) -> Console:
    """The served console, with empty tables and a reset provider (the `app` fixture)."""
    return console_server


# --- the browser --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        missing_service("Chromium (apt-get install chromium chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing_service("selenium (pip install -e '.[dev]')")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--no-proxy-server",
        "--lang=en-US",
        "--window-size=1280,900",
        "--force-device-scale-factor=1",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    except WebDriverException as exc:
        missing_service(f"Chromium would not start: {exc.msg}")
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def driver(browser: Any, console: Console) -> Iterator[Any]:
    """The shared browser with this origin's storage wiped; no CSP violation allowed."""
    browser.get(console.url("/console/signin"))
    browser.execute_script("sessionStorage.clear(); localStorage.clear();")
    browser.get_log("browser")  # drop earlier entries
    yield browser
    violations = [
        entry["message"]
        for entry in browser.get_log("browser")
        if entry.get("source") == "security"
        or "Content Security Policy" in entry["message"]
        or "Refused to" in entry["message"]
    ]
    assert not violations, violations


def _explain(driver: Any) -> str:
    logs = "\n".join(entry["message"] for entry in driver.get_log("browser"))
    body = driver.find_element("tag name", "body").text
    return f"url: {driver.current_url}\npage text:\n{body}\nbrowser log:\n{logs}"


def wait_for(driver: Any, predicate: Callable[[Any], Any], what: str) -> Any:
    """Poll until truthy; pages re-render, so stale and missing elements mean "not yet"."""
    from selenium.common.exceptions import (
        NoSuchElementException,
        StaleElementReferenceException,
        TimeoutException,
    )
    from selenium.webdriver.support.ui import WebDriverWait

    ignored = (NoSuchElementException, StaleElementReferenceException, IndexError)
    try:
        return WebDriverWait(driver, WAIT_SECONDS, ignored_exceptions=ignored).until(predicate)
    except TimeoutException:
        pytest.fail(f"timed out waiting for {what}\n{_explain(driver)}", pytrace=False)


def css(driver: Any, selector: str) -> list[Any]:
    return driver.find_elements("css selector", selector)


def wait_text(driver: Any, selector: str, text: str) -> Any:
    def found(d: Any) -> Any:
        for element in css(d, selector):
            if text in element.text:
                return element
        return None

    return wait_for(driver, found, f"{text!r} in {selector}")


def sign_in(driver: Any, console: Console, user: int = 7, org: int = 3, admin: bool = True) -> str:
    """Development sign-in through the form; returns the token held in sessionStorage."""
    driver.get(console.url("/"))
    wait_for(driver, lambda d: d.current_url.endswith("/console/signin"), "the sign-in page")
    for field_id, value in (("dev-user", user), ("dev-org", org)):
        field = driver.find_element("id", field_id)
        field.clear()
        field.send_keys(str(value))
    checkbox = driver.find_element("id", "dev-admin")
    if checkbox.is_selected() != admin:
        checkbox.click()
    driver.find_element("id", "dev-submit").click()
    suffix = " · admin" if admin else ""
    wait_text(driver, "#who-text", f"user {user} · org {org}{suffix}")
    assert driver.current_url == console.url("/console/")
    return driver.execute_script("return sessionStorage.getItem('mailkey.jwt')")


def connect(driver: Any, console: Console, provider: str = "Google") -> None:
    """Click Connect on the Mailboxes page: provider, back to the completion page."""
    if not driver.current_url.startswith(console.url("/console/")) or "/oauth/" in (
        driver.current_url
    ):
        driver.get(console.url("/console/"))
    button = wait_for(
        driver,
        lambda d: next(
            (b for b in css(d, "#connect [data-provider]") if b.text == f"Connect {provider}"),
            None,
        ),
        f"the Connect {provider} button",
    )
    button.click()
    wait_for(
        driver,
        lambda d: d.current_url.startswith(console.url("/console/oauth/complete")),
        "the completion page",
    )


def card(driver: Any, email: str) -> Any:
    return wait_for(
        driver,
        lambda d: next(iter(css(d, f'.mailbox[data-email="{email}"]')), None),
        f"the card of {email}",
    )


def card_button(driver: Any, email: str, label: str) -> Any:
    return wait_for(
        driver,
        lambda d: next(
            (
                b
                for b in css(d, f'.mailbox[data-email="{email}"] .actions .btn')
                if b.text == label and b.is_enabled()
            ),
            None,
        ),
        f"the {label} button of {email}",
    )


def card_status(driver: Any, email: str, text: str) -> Any:
    return wait_text(driver, f'.mailbox[data-email="{email}"] .card-status', text)


def stored_token(console: Console, email: str) -> UserEmailToken:
    with console.app.app_context():
        token = db.session.scalar(
            sa.select(UserEmailToken).where(UserEmailToken.email_address == email)
        )
        assert token is not None, f"no token stored for {email}"
        db.session.expunge(token)
        return token


# --- end to end ---------------------------------------------------------------------------


@pytest.mark.browser
def test_sign_in_keeps_the_token_in_session_storage_only(driver: Any, console: Console) -> None:
    token = sign_in(driver, console)
    assert token and token.count(".") == 2
    assert token not in driver.current_url
    assert token not in driver.page_source
    assert driver.execute_script("return localStorage.length") == 0
    assert driver.get_cookies() == []

    driver.find_element("id", "signout").click()
    wait_for(driver, lambda d: d.current_url.endswith("/console/signin"), "the sign-in page")
    assert driver.execute_script("return sessionStorage.getItem('mailkey.jwt')") is None


@pytest.mark.browser
def test_connect_refresh_and_revoke_a_mailbox(
    driver: Any, console: Console, oauth_provider: OAuthProvider
) -> None:
    sign_in(driver, console, user=7, org=3)
    oauth_provider.next_user_email = "alice@example.com"
    connect(driver, console, "Google")
    wait_text(driver, "#complete", "Connected alice@example.com (Google).")
    assert driver.current_url == console.url("/console/oauth/complete"), "code/state left the URL"
    assert "code=" not in driver.execute_script("return location.href")

    oauth_provider.next_user_email = "bob@example.com"
    connect(driver, console, "Microsoft")
    wait_text(driver, "#complete", "Connected bob@example.com (Microsoft).")

    driver.find_element("link text", "Back to mailboxes").click()
    alice = card(driver, "alice@example.com")
    card(driver, "bob@example.com")
    wait_text(driver, '.mailbox[data-email="alice@example.com"] .badge', "token active")
    assert re.search(r"sync (active|error|paused)", alice.text), alice.text
    _add_sync_runs(console, "alice@example.com")
    _add_sync_runs(console, "bob@example.com", failed=True)

    before = stored_token(console, "alice@example.com")
    card_button(driver, "alice@example.com", "Refresh").click()
    card_status(driver, "alice@example.com", "Token refreshed: it now expires")
    assert oauth_provider.requests[-1][1]["grant_type"] == "refresh_token"
    after = stored_token(console, "alice@example.com")
    assert (
        after.last_refreshed_at is not None and after.last_refreshed_at != before.last_refreshed_at
    )
    wait_text(driver, '.mailbox[data-email="alice@example.com"] .runs', "succeeded")
    wait_text(driver, '.mailbox[data-email="bob@example.com"] .runs', "IMAP login refused")

    if os.environ.get("MAILKEY_SCREENSHOT"):  # refreshes the README's picture on demand
        driver.save_screenshot(str(SCREENSHOT))

    card_button(driver, "alice@example.com", "Revoke").click()
    _accept_confirm(driver, "Revoke Mailkey's access to alice@example.com?")
    card_status(driver, "alice@example.com", "Revoked at the provider and wiped here.")
    wait_text(driver, '.mailbox[data-email="alice@example.com"] .badge', "token revoked")
    wait_text(driver, '.mailbox[data-email="alice@example.com"] .badge', "sync paused")
    revoked = stored_token(console, "alice@example.com")
    assert revoked.status == "revoked" and revoked.access_token_encrypted is None
    assert oauth_provider.revoked, "the provider's revocation endpoint was not called"

    # A cancelled confirmation changes nothing.
    card_button(driver, "bob@example.com", "Revoke").click()
    _accept_confirm(driver, "Revoke Mailkey's access to bob@example.com?", accept=False)
    card_status(driver, "bob@example.com", "Revoke cancelled")
    assert stored_token(console, "bob@example.com").status == "active"


def _accept_confirm(driver: Any, question: str, accept: bool = True) -> None:
    from selenium.webdriver.support import expected_conditions

    alert = wait_for(driver, expected_conditions.alert_is_present(), "the confirmation dialog")
    assert question in alert.text
    alert.accept() if accept else alert.dismiss()


def _add_sync_runs(console: Console, email: str, failed: bool = False) -> None:
    """Finished runs as the sync engine records them, for the runs table."""
    now = utcnow()
    with console.app.app_context():
        account = db.session.scalar(
            sa.select(MailAccount).where(MailAccount.email_address == email)
        )
        assert account is not None
        db.session.add(
            SyncRun(
                account_id=account.id,
                organization_id=account.organization_id,
                started_at=now - timedelta(minutes=5, seconds=3),
                finished_at=now - timedelta(minutes=5),
                outcome="failed" if failed else "succeeded",
                new_count=0 if failed else 42,
                updated_count=0 if failed else 3,
                deleted_count=0 if failed else 1,
                error="IMAP login refused: [AUTHENTICATIONFAILED]" if failed else None,
            )
        )
        if not failed:
            account.last_synced_at = now - timedelta(minutes=5)
        db.session.commit()


@pytest.mark.browser
def test_sync_toggle_and_sync_now_end_in_a_message(driver: Any, console: Console) -> None:
    sign_in(driver, console)
    connect(driver, console)
    wait_text(driver, "#complete", "Connected user@example.com")
    driver.get(console.url("/console/"))
    card_button(driver, "user@example.com", "Disable sync").click()
    card_status(driver, "user@example.com", "Sync disabled")
    wait_text(driver, '.mailbox[data-email="user@example.com"] .badge', "sync disabled")
    card_button(driver, "user@example.com", "Enable sync").click()
    card_status(driver, "user@example.com", "Sync enabled.")
    with console.app.app_context():
        assert db.session.scalar(sa.select(MailAccount.sync_enabled)) is True

    # Finish the queued run the way a worker would (unless a test worker already did),
    # so "Sync now" ends in that run's figures.
    card_button(driver, "user@example.com", "Sync now").click()
    line = '.mailbox[data-email="user@example.com"] .card-status'
    shown = wait_for(
        driver,
        lambda d: re.search(
            r"Syncing \(run (\d+)\)|Sync finished|Sync failed", css(d, line)[0].text
        ),
        "sync progress",
    )
    if shown.group(1):
        with console.app.app_context():
            db.session.execute(
                sa.update(SyncRun)
                .where(SyncRun.id == int(shown.group(1)), SyncRun.outcome == "running")
                .values(outcome="succeeded", finished_at=utcnow(), new_count=5)
            )
            db.session.commit()
    with console.app.app_context():
        run = db.session.scalar(sa.select(SyncRun).order_by(SyncRun.id.desc()))
    if run.outcome == "succeeded":
        card_status(
            driver,
            "user@example.com",
            f"Sync finished: {run.new_count} new, {run.updated_count} updated, "
            f"{run.deleted_count} deleted",
        )
    else:
        card_status(driver, "user@example.com", "Sync failed:")


@pytest.mark.browser
@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("deny", "Consent was declined at the provider, so no mailbox was connected."),
        ("scope", "The provider did not grant access to mail (missing mail scope)."),
    ],
)
def test_failed_connection_is_explained(
    driver: Any, console: Console, oauth_provider: OAuthProvider, setup: str, message: str
) -> None:
    sign_in(driver, console)
    if setup == "deny":
        oauth_provider.deny_next = True
    else:
        oauth_provider.granted_scopes = "openid email profile"
    connect(driver, console, "Google")
    status = wait_text(driver, "#complete .card-status", message)
    assert status.get_attribute("role") == "alert"
    assert "Mailkey said:" in driver.find_element("id", "complete").text
    assert driver.current_url == console.url("/console/oauth/complete")
    with console.app.app_context():
        assert db.session.scalar(sa.select(sa.func.count()).select_from(UserEmailToken)) == 0


@pytest.mark.browser
def test_replayed_or_foreign_state_is_explained(driver: Any, console: Console) -> None:
    sign_in(driver, console)
    driver.execute_script("sessionStorage.setItem('mailkey.oauth_provider', 'google')")
    driver.get(console.url("/console/oauth/complete?code=forged&state=not-a-real-state"))
    wait_text(driver, "#complete .card-status", "This connection attempt is no longer valid")
    assert "unknown, expired or already used OAuth state" in driver.page_source


@pytest.mark.browser
def test_completion_page_with_provider_in_its_path(
    driver: Any, console: Console, oauth_provider: OAuthProvider
) -> None:
    config = console.app.config
    original = config["OAUTH_REDIRECT_URI"]
    config["OAUTH_REDIRECT_URI"] = console.url("/console/oauth/complete/{provider}")
    try:
        sign_in(driver, console)
        oauth_provider.next_user_email = "carol@example.com"
        connect(driver, console, "Yahoo")
        wait_text(driver, "#complete", "Connected carol@example.com (Yahoo).")
        assert driver.current_url == console.url("/console/oauth/complete/yahoo")
    finally:
        config["OAUTH_REDIRECT_URI"] = original


@pytest.mark.browser
def test_message_subjects_render_as_text_and_pages_follow_the_cursor(
    driver: Any, console: Console
) -> None:
    sign_in(driver, console)
    connect(driver, console)
    wait_text(driver, "#complete", "Connected user@example.com")
    with console.app.app_context():
        account = db.session.scalar(sa.select(MailAccount))
        folder = MailFolder(account_id=account.id, name="INBOX", flags=[], message_count=51)
        db.session.add(folder)
        db.session.flush()
        now = utcnow()
        for uid in range(1, 52):
            db.session.add(
                MailMessage(
                    account_id=account.id,
                    folder_id=folder.id,
                    uid=uid,
                    subject=XSS_SUBJECT if uid == 1 else f"Message {uid}",
                    from_address="<b>mallory</b>@example.com",
                    to_addresses=["user@example.com"],
                    cc_addresses=[],
                    sent_at=now - timedelta(minutes=uid),
                    flags=["\\Seen"],
                    size=2048,
                )
            )
        db.session.commit()
        account_id = account.id

    driver.get(console.url(f"/console/messages?account={account_id}&folder=INBOX"))
    wait_for(driver, lambda d: len(css(d, "#messages tbody tr")) == 50, "the first page")
    assert driver.find_element("id", "page-info").text == "Page 1"
    driver.find_element("id", "next").click()
    wait_text(driver, "#page-info", "Page 2")
    subject = wait_text(driver, "#messages tbody .subject", "<script>")
    assert subject.text == XSS_SUBJECT
    assert "<b>mallory</b>@example.com" in driver.find_element("id", "messages").text
    assert css(driver, "#messages img") == [] and css(driver, "#messages b") == []
    assert driver.execute_script("return window.__xss") is None
    driver.find_element("id", "prev").click()
    wait_text(driver, "#page-info", "Page 1")
    assert driver.execute_script("return window.__xss") is None


@pytest.mark.browser
def test_health_page_shows_figures_and_chart_for_admins(
    driver: Any, console: Console, oauth_provider: OAuthProvider
) -> None:
    sign_in(driver, console, admin=True)
    connect(driver, console)
    wait_text(driver, "#complete", "Connected user@example.com")
    driver.get(console.url("/console/"))
    card_button(driver, "user@example.com", "Refresh").click()
    card_status(driver, "user@example.com", "Token refreshed")

    driver.find_element("link text", "Health").click()
    wait_text(driver, '[data-figure="tokens.total"]', "1")
    assert driver.find_element("css selector", '[data-figure="tokens.active"]').text == "1"
    assert driver.find_element("css selector", '[data-figure="sync.accounts.total"]').text == "1"
    wait_for(driver, lambda d: css(d, "svg.timeline rect.refresh-success"), "a refresh bar")
    wait_text(driver, "#updated", "refreshes every 30 s")
    driver.find_element("id", "chart").screenshot("/tmp/console-chart.png")


@pytest.mark.browser
def test_health_page_asks_non_admins_for_the_admin_role(driver: Any, console: Console) -> None:
    sign_in(driver, console, admin=False)
    driver.get(console.url("/console/health"))
    wait_text(driver, "#notice", "The Health page needs the admin role")


@pytest.mark.browser
def test_expired_session_goes_back_to_sign_in_with_a_reason(driver: Any, console: Console) -> None:
    sign_in(driver, console)
    driver.execute_script("sessionStorage.setItem('mailkey.jwt', 'a.b.c')")
    driver.get(console.url("/console/messages"))
    wait_for(driver, lambda d: d.current_url.endswith("/console/signin"), "the sign-in page")
    wait_text(driver, "#notice", "Your session ended: the bearer token is invalid")


# --- over HTTP without a browser ----------------------------------------------------------


CONSOLE_PAGES = (
    "/console/",
    "/console/signin",
    "/console/messages",
    "/console/health",
    "/console/oauth/complete",
    "/console/oauth/complete/google",
)


@pytest.mark.parametrize("path", CONSOLE_PAGES)
def test_console_pages_send_the_strict_csp(client: FlaskClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 200
    assert response.headers["Content-Security-Policy"] == CONSOLE_CSP
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["Cache-Control"] == "no-store"
    html = response.get_data(as_text=True)
    assert re.findall(r"<script(?![^>]*\ssrc=)", html) == [], "inline script"
    attributes = {name.lower() for name in re.findall(r"\s([a-zA-Z-]+)=", html)}
    assert "style" not in attributes and not {a for a in attributes if a.startswith("on")}
    assert "<style" not in html


def test_root_redirects_to_the_console(client: FlaskClient) -> None:
    response = client.get("/")
    assert response.status_code == 302 and response.headers["Location"] == "/console/"


def test_provider_buttons_and_list_name_configured_providers_only(
    base_env: dict[str, str],
) -> None:
    env = {k: v for k, v in base_env.items() if not k.startswith("YAHOO_")}
    client = make_app(env).test_client()
    html = client.get("/console/").get_data(as_text=True)
    assert 'data-provider="google"' in html and 'data-provider="microsoft"' in html
    assert 'data-provider="yahoo"' not in html
    assert client.get("/console/providers").json == {
        "items": [
            {"name": "google", "label": "Google"},
            {"name": "microsoft", "label": "Microsoft"},
        ]
    }


def test_default_redirect_uri_is_the_console_completion_page(
    base_env: dict[str, str], make_token: Callable[..., str], app: Flask
) -> None:
    client = make_app(base_env, OAUTH_REDIRECT_URI="").test_client()
    headers = {"Authorization": f"Bearer {make_token()}"}
    login = client.get("/api/v1/oauth/login/google?response=json", headers=headers)
    assert login.status_code == 200, login.json
    assert "redirect_uri=http%3A%2F%2Flocalhost%2Fconsole%2Foauth%2Fcomplete&" in (
        login.json["authorization_url"] + "&"
    )


def test_dev_token_endpoint_validates_its_body(client: FlaskClient) -> None:
    assert client.post("/console/dev/token", data="user_id=1").status_code == 400
    bad = client.post("/console/dev/token", json={"user_id": "x", "admin": "yes"})
    assert bad.status_code == 422
    assert set(bad.json["error"]["fields"]) == {"user_id", "admin"}
    good = client.post("/console/dev/token", json={"user_id": 5, "organization_id": 9})
    me = client.get("/api/v1/me", headers={"Authorization": f"Bearer {good.json['token']}"})
    assert me.json == {"user_id": 5, "organization_id": 9, "roles": []}
    assert good.headers["Cache-Control"] == "no-store"


def test_console_disabled_is_404_everywhere(base_env: dict[str, str]) -> None:
    client = make_app(base_env, CONSOLE_ENABLED="false").test_client()
    for path in ("/", "/console/", "/console/signin", "/console/static/api.js"):
        assert client.get(path).status_code == 404, path
    assert client.post("/console/dev/token", json={}).status_code == 404


def test_dev_token_endpoint_does_not_exist_in_production(
    base_env: dict[str, str], tmp_path: Path
) -> None:
    env = {
        "MAILKEY_ENV": "production",
        "MAILKEY_INSTANCE_PATH": str(tmp_path),
        "DATABASE_URL": base_env["DATABASE_URL"],
        "REDIS_URL": base_env["REDIS_URL"],
        "API_JWT_SECRET": base_env["API_JWT_SECRET"],
        "ENCRYPTION_KEY_OAUTH_AES_GCM": base_env["ENCRYPTION_KEY_OAUTH_AES_GCM"],
        "ENCRYPTION_KEY_PII": base_env["ENCRYPTION_KEY_PII"],
        "OAUTH_REDIRECT_URI": "https://mailkey.example.com/console/oauth/complete",
        "GOOGLE_CLIENT_ID": "prod-client",
        "GOOGLE_CLIENT_SECRET": "prod-secret",
        "LOG_FORMAT": "text",
    }
    settings = Settings.from_env(env)
    assert settings.production
    client = create_app(settings=settings).test_client()
    assert client.post("/console/dev/token", json={"user_id": 1}).status_code == 404
    assert client.get("/console/dev/token").status_code == 404
    signin = client.get("/console/signin")
    assert signin.status_code == 200
    html = signin.get_data(as_text=True)
    assert 'id="dev-form"' not in html and 'data-development="false"' in html


@pytest.mark.parametrize("path", ["/console/", "/console/signin"])
def test_first_page_weighs_under_200_kb(client: FlaskClient, path: str) -> None:
    """The page, its stylesheet, icon and scripts with every module they import."""
    html = client.get(path).get_data()
    assets = re.findall(rb'(?:href|src)="(/console/static/[^"]+)"', html)
    seen: set[str] = set()
    total = len(html)
    queue = [a.decode() for a in assets]
    while queue:
        url = queue.pop()
        if url in seen:
            continue
        seen.add(url)
        body = client.get(url)
        assert body.status_code == 200, url
        total += len(body.get_data())
        if url.endswith(".js"):
            for module in re.findall(r'from "\./([\w.-]+\.js)"', body.get_data(as_text=True)):
                queue.append(url.rsplit("/", 1)[0] + "/" + module)
    print(f"{path}: {total} bytes in {len(seen) + 1} files ({', '.join(sorted(seen))})")
    assert len(seen) >= 3
    assert total < PAGE_BUDGET_BYTES

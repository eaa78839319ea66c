"""A mail server that accepts the connection and then says nothing must not hold a
worker: opening the connection gives up after MAIL_TIMEOUT_SECONDS."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from webapp.services import mailconn


@pytest.fixture
def silent_server() -> Iterator[int]:
    """Accepts connections (the TCP handshake completes) and never sends a byte."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for connection in accepted:
        connection.close()
    server.close()


@pytest.mark.parametrize("security", ["ssl", "starttls"])
def test_opening_a_connection_to_a_silent_server_times_out(
    app, silent_server, security, monkeypatch
):
    monkeypatch.setitem(app.config, "MAIL_TIMEOUT_SECONDS", 1)
    outcome: list[BaseException | None] = []

    def connect() -> None:
        with app.app_context():
            try:
                mailconn._imap_open("127.0.0.1", silent_server, security)
                outcome.append(None)
            except BaseException as exc:  # noqa: BLE001 - the test reads it
                outcome.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=connect, daemon=True)  # a hang must not hang the suite
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "the connection attempt is still waiting after 10 s"
    assert time.monotonic() - started < 5
    assert isinstance(outcome[0], OSError), outcome  # socket.timeout is an OSError

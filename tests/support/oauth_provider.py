"""A local OAuth2 / OpenID Connect provider for tests, served over real HTTP.

It auto-approves ``/authorize`` (no login page), enforces PKCE (S256), single-use
authorization codes, client authentication and refresh-token rotation policies, and
supports revocation, RFC 7662 introspection (for Dovecot / the SMTP test server) and
scripted failures. See :class:`OAuthProvider`.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import hmac
import json
import secrets
import socket
import socketserver
import threading
import time
import traceback
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote_plus, urlencode, urlsplit, urlunsplit

ENDPOINTS = ("authorize", "token", "userinfo", "revoke", "introspect")
ROTATIONS = ("none", "rotate", "strict")
AUTH_METHODS = ("client_secret_post", "client_secret_basic")


@dataclass
class ScriptedResponse:
    """A canned answer for one request to one endpoint (see :meth:`OAuthProvider.script`).

    ``status`` defaults to 503. Exception: a response with only ``delay`` set (no status,
    json or body) is a pure delay: it sleeps, then the request is handled normally.
    ``json`` is serialised as the body; otherwise ``body`` (str/bytes) is sent verbatim.
    """

    status: int | None = None
    json: Any = None
    body: str | bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0

    @property
    def passthrough(self) -> bool:
        return self.status is None and self.json is None and self.body is None and self.delay > 0


@dataclass
class _Grant:
    email: str
    scope: str
    alive: bool = True


@dataclass
class _Code:
    email: str
    redirect_uri: str
    scope: str
    challenge: str
    nonce: str | None
    expires_at: float
    used: bool = False


@dataclass
class _Access:
    grant: _Grant
    expires_at: float
    active: bool = True

    def live(self) -> bool:
        return self.active and self.grant.alive and time.time() < self.expires_at


@dataclass
class _Refresh:
    grant: _Grant
    alive: bool = True


class _OAuthError(Exception):
    def __init__(self, status: int, error: str, description: str | None = None) -> None:
        super().__init__(error)
        self.status, self.error, self.description = status, error, description


# (status, body, headers) as produced by the endpoint handlers
_Reply = tuple[int, bytes, dict[str, str]]


def _json_reply(status: int, payload: Any, headers: dict[str, str] | None = None) -> _Reply:
    base = {"Content-Type": "application/json", "Cache-Control": "no-store", "Pragma": "no-cache"}
    return status, json.dumps(payload).encode(), {**base, **(headers or {})}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _add_query(url: str, params: dict[str, str]) -> str:
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True) + list(params.items())
    return urlunsplit(parts._replace(query=urlencode(query)))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every reply carries Content-Length
    # Headers and body go out as two writes: without TCP_NODELAY, Nagle's algorithm
    # and the client's delayed ACK add ~40 ms to every answer.
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet: no request logging
        pass

    def do_GET(self) -> None:
        self.server.provider._dispatch(self)

    do_POST = do_GET

    def read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        try:
            self.send_response(status)
            for name, value in headers.items():
                if name.lower() != "content-length":
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
        except OSError:  # client went away (e.g. it timed out during a scripted delay)
            self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128  # tests fire many concurrent connections

    def __init__(self, provider: OAuthProvider) -> None:
        self.provider = provider
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def server_bind(self) -> None:  # skip HTTPServer's getfqdn() reverse-DNS lookup
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "127.0.0.1", self.server_address[1]

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        with self._conns_lock:
            self._conns.add(sock)
        return sock, addr

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # quiet; handler bugs are caught in _dispatch and recorded in provider.errors

    def close_connections(self) -> None:
        """Drop idle keep-alive connections so pooled clients cannot reach a stopped server."""
        with self._conns_lock:
            conns = list(self._conns)
        for sock in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class OAuthProvider:
    """Auto-approving OAuth2/OIDC provider on ``http://127.0.0.1:<free port>``."""

    def __init__(
        self,
        *,
        client_id: str = "test-client",
        client_secret: str = "test-secret",  # noqa: S107
        access_token_ttl: int = 3600,
        rotation: str = "none",
        token_auth_method: str = "client_secret_post",  # noqa: S107
        issue_id_token: bool = True,
        code_ttl: float = 60.0,
    ) -> None:
        if rotation not in ROTATIONS:
            raise ValueError(f"rotation must be one of {ROTATIONS}")
        if token_auth_method not in AUTH_METHODS:
            raise ValueError(f"token_auth_method must be one of {AUTH_METHODS}")
        self.client_id = client_id
        self.client_secret = client_secret
        # Toggles a test may change; reset() puts these values back.
        self._defaults = {
            "access_token_ttl": access_token_ttl,
            "rotation": rotation,
            "token_auth_method": token_auth_method,
            "issue_id_token": issue_id_token,
            "code_ttl": code_ttl,
        }
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.reset()

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> OAuthProvider:
        if self._server is not None:
            raise RuntimeError("OAuthProvider already started")
        self._stopping.clear()
        self._server = _Server(self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"oauth-provider-{self._server.server_port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        self._stopping.set()  # cuts scripted delays short
        server.shutdown()
        server.close_connections()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> OAuthProvider:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("OAuthProvider not started")
        return f"http://127.0.0.1:{self._server.server_port}"

    def url(self, endpoint: str) -> str:
        return f"{self.base_url}/{endpoint}"

    def env(self, prefix: str) -> dict[str, str]:
        """Env-var overrides for Mailkey, e.g. ``env("GOOGLE")``."""
        return {
            f"{prefix}_AUTHORIZE_URL": self.url("authorize"),
            f"{prefix}_TOKEN_URL": self.url("token"),
            f"{prefix}_USERINFO_URL": self.url("userinfo"),
            f"{prefix}_REVOKE_URL": self.url("revoke"),
            f"{prefix}_CLIENT_ID": self.client_id,
            f"{prefix}_CLIENT_SECRET": self.client_secret,
        }

    # ----------------------------------------------------------------- test controls
    def reset(self) -> None:
        """Forget all codes/tokens/scripts/counters and restore the toggles to defaults."""
        with self._lock:
            for name, value in self._defaults.items():
                setattr(self, name, value)
            self.next_user_email = "user@example.com"
            self.honor_login_hint = True
            self.deny_next = False
            self.granted_scopes: str | None = None
            self.omit_scope_in_response = False
            self.calls: collections.Counter[str] = collections.Counter()
            self.max_concurrent: collections.Counter[str] = collections.Counter()
            self._inflight: collections.Counter[str] = collections.Counter()
            self.requests: list[tuple[str, dict[str, str], dict[str, str]]] = []
            self.revoke_requests: list[tuple[dict[str, str], dict[str, str]]] = []
            self.authorize_requests: list[dict[str, str]] = []
            self.revoked: list[str] = []
            self.errors: list[str] = []
            self._scripts: dict[str, collections.deque[ScriptedResponse]] = {
                name: collections.deque() for name in ENDPOINTS
            }
            self._codes: dict[str, _Code] = {}
            self._access: dict[str, _Access] = {}
            self._refresh: dict[str, _Refresh] = {}

    def script(self, endpoint: str, *responses: ScriptedResponse) -> None:
        """Queue responses (FIFO, one per request) served before normal handling."""
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {ENDPOINTS}")
        with self._lock:
            self._scripts[endpoint].extend(responses)

    def fail_token_with(
        self, error: str, status: int = 400, description: str | None = None
    ) -> None:
        """One-shot: the next /token request gets ``{"error": error, ...}`` with ``status``."""
        payload = {"error": error} | ({"error_description": description} if description else {})
        self.script("token", ScriptedResponse(status=status, json=payload))

    def expire_access_token(self, token: str) -> None:
        with self._lock:
            self._access[token].expires_at = time.time() - 1

    def expire_all_access_tokens(self) -> None:
        with self._lock:
            for record in self._access.values():
                record.expires_at = time.time() - 1

    def revoke_grant_for(self, email: str) -> int:
        """Kill every grant of ``email`` (refresh + access tokens). Returns how many."""
        with self._lock:
            grants = {id(r.grant): r.grant for r in self._refresh.values()}
            grants |= {id(a.grant): a.grant for a in self._access.values()}
            killed = [g for g in grants.values() if g.email == email and g.alive]
            for grant in killed:
                grant.alive = False
            return len(killed)

    def issue_tokens_for(self, email: str, scope: str = "openid email") -> dict[str, Any]:
        """Mint a token set (with refresh_token and scope) without the browser dance."""
        with self._lock:
            grant = _Grant(email=email, scope=scope)
            tokens = self._issue(grant, self._new_refresh(grant), nonce=None)
        return tokens | {"scope": scope}

    def access_token_active(self, token: str) -> bool:
        with self._lock:
            record = self._access.get(token)
            return record is not None and record.live()

    def refresh_token_alive(self, token: str) -> bool:
        with self._lock:
            record = self._refresh.get(token)
            return record is not None and record.alive and record.grant.alive

    @staticmethod
    def sub_for(email: str) -> str:
        """The stable ``sub`` claim used for ``email``."""
        return str(int.from_bytes(hashlib.sha256(email.lower().encode()).digest()[:8], "big"))

    # ----------------------------------------------------------------- HTTP plumbing
    def _dispatch(self, handler: _Handler) -> None:
        parts = urlsplit(handler.path)
        endpoint = parts.path.strip("/")
        body = handler.read_body()
        if endpoint not in ENDPOINTS:
            handler.reply(*_json_reply(404, {"error": "not_found"}))
            return
        params = dict(parse_qsl(parts.query))
        form = dict(parse_qsl(body.decode("utf-8", "replace")))
        headers = dict(handler.headers.items())
        with self._lock:
            self.calls[endpoint] += 1
            if endpoint == "token":
                self.requests.append((endpoint, dict(form), headers))
            elif endpoint == "revoke":
                self.revoke_requests.append((dict(form), headers))
            self._inflight[endpoint] += 1
            peak = max(self.max_concurrent[endpoint], self._inflight[endpoint])
            self.max_concurrent[endpoint] = peak
            queue = self._scripts[endpoint]
            scripted = queue.popleft() if queue else None
        try:
            if scripted is not None:
                if scripted.delay:
                    self._stopping.wait(scripted.delay)
                if not scripted.passthrough:
                    handler.reply(*self._scripted_reply(scripted))
                    return
            try:
                reply = self._handle(endpoint, handler.command, params, form, headers)
            except _OAuthError as exc:
                extra = {"error_description": exc.description} if exc.description else {}
                reply = _json_reply(exc.status, {"error": exc.error} | extra)
            except Exception:
                with self._lock:
                    self.errors.append(traceback.format_exc())
                reply = _json_reply(500, {"error": "server_error"})
            handler.reply(*reply)
        finally:
            with self._lock:
                self._inflight[endpoint] -= 1

    @staticmethod
    def _scripted_reply(scripted: ScriptedResponse) -> _Reply:
        status = scripted.status if scripted.status is not None else 503
        if scripted.json is not None:
            return _json_reply(status, scripted.json, scripted.headers)
        body = scripted.body or b""
        data = body.encode() if isinstance(body, str) else body
        ctype = "text/html; charset=utf-8" if data.lstrip().startswith(b"<") else "text/plain"
        return status, data, {"Content-Type": ctype, **scripted.headers}

    def _handle(
        self,
        endpoint: str,
        method: str,
        params: dict[str, str],
        form: dict[str, str],
        headers: dict[str, str],
    ) -> _Reply:
        if endpoint == "authorize":
            return self._authorize(params | form)
        if endpoint == "userinfo":
            return self._userinfo(headers)
        if endpoint == "introspect":
            return self._introspect(params | form, headers)
        if method != "POST":
            raise _OAuthError(405, "invalid_request", "POST required")
        if endpoint == "token":
            return self._token(form, headers)
        return self._revoke(form)

    # ----------------------------------------------------------------- endpoints
    def _authorize(self, q: dict[str, str]) -> _Reply:
        with self._lock:
            self.authorize_requests.append(dict(q))
            deny, self.deny_next = self.deny_next, False
        if q.get("client_id") != self.client_id:
            raise _OAuthError(400, "invalid_client", "unknown client_id")
        redirect_uri = q.get("redirect_uri")
        if not redirect_uri:
            raise _OAuthError(400, "invalid_request", "redirect_uri required")

        def redirect(**params: str) -> _Reply:
            if "state" in q:
                params["state"] = q["state"]
            return (
                302,
                b"",
                {"Location": _add_query(redirect_uri, params), "Cache-Control": "no-store"},
            )

        if deny:
            return redirect(error="access_denied", error_description="The user denied access")
        if q.get("response_type") != "code":
            return redirect(error="unsupported_response_type")
        challenge = q.get("code_challenge")
        if not challenge:
            return redirect(error="invalid_request", error_description="PKCE required")
        if q.get("code_challenge_method", "plain") != "S256":
            only_s256 = "code_challenge_method must be S256"
            return redirect(error="invalid_request", error_description=only_s256)
        login_hint = q.get("login_hint") if self.honor_login_hint else None
        code = secrets.token_urlsafe(32)
        with self._lock:
            self._codes[code] = _Code(
                email=login_hint or self.next_user_email,
                redirect_uri=redirect_uri,
                scope=q.get("scope", ""),
                challenge=challenge,
                nonce=q.get("nonce"),
                expires_at=time.time() + self.code_ttl,
            )
        return redirect(code=code)

    def _check_client(self, form: dict[str, str], headers: dict[str, str]) -> None:
        auth = next((v for k, v in headers.items() if k.lower() == "authorization"), "")
        if self.token_auth_method == "client_secret_basic":
            if not auth.lower().startswith("basic ") or "client_secret" in form:
                raise _OAuthError(401, "invalid_client", "client_secret_basic required")
            try:
                raw = base64.b64decode(auth[6:].strip()).decode()
            except ValueError:
                raise _OAuthError(401, "invalid_client", "malformed Basic credentials") from None
            cid, _, secret = raw.partition(":")
            cid, secret = unquote_plus(cid), unquote_plus(secret)
            if form.get("client_id", cid) != cid:
                raise _OAuthError(401, "invalid_client", "client_id mismatch")
        else:
            if auth.lower().startswith("basic "):
                raise _OAuthError(401, "invalid_client", "client_secret_post required")
            cid, secret = form.get("client_id", ""), form.get("client_secret", "")
        if cid != self.client_id or not hmac.compare_digest(secret, self.client_secret):
            raise _OAuthError(401, "invalid_client", "bad client credentials")

    def _token(self, form: dict[str, str], headers: dict[str, str]) -> _Reply:
        self._check_client(form, headers)
        grant_type = form.get("grant_type")
        with self._lock:
            if grant_type == "authorization_code":
                return _json_reply(200, self._redeem_code(form))
            if grant_type == "refresh_token":
                return _json_reply(200, self._redeem_refresh(form))
        raise _OAuthError(400, "unsupported_grant_type")

    def _redeem_code(self, form: dict[str, str]) -> dict[str, Any]:
        code = self._codes.get(form.get("code", ""))
        if code is None:
            raise _OAuthError(400, "invalid_grant", "unknown authorization code")
        if code.used:
            raise _OAuthError(400, "invalid_grant", "authorization code already used")
        code.used = True  # any redemption attempt consumes the code
        if time.time() > code.expires_at:
            raise _OAuthError(400, "invalid_grant", "authorization code expired")
        if form.get("redirect_uri") != code.redirect_uri:
            raise _OAuthError(400, "invalid_grant", "redirect_uri mismatch")
        verifier = form.get("code_verifier", "")
        expected = _b64url(hashlib.sha256(verifier.encode()).digest())
        if not verifier or not hmac.compare_digest(expected, code.challenge):
            raise _OAuthError(400, "invalid_grant", "PKCE verification failed")
        scope = self.granted_scopes if self.granted_scopes is not None else code.scope
        grant = _Grant(email=code.email, scope=scope)
        return self._issue(grant, self._new_refresh(grant), nonce=code.nonce)

    def _redeem_refresh(self, form: dict[str, str]) -> dict[str, Any]:
        record = self._refresh.get(form.get("refresh_token", ""))
        if record is None:
            raise _OAuthError(400, "invalid_grant", "unknown refresh token")
        if not (record.alive and record.grant.alive):
            raise _OAuthError(400, "invalid_grant", "Token has been expired or revoked.")
        requested = form.get("scope", "").split()
        if not set(requested) <= set(record.grant.scope.split()):  # RFC 6749 6
            raise _OAuthError(400, "invalid_scope", "scope exceeds the original grant")
        new_refresh = None
        if self.rotation in ("rotate", "strict"):
            new_refresh = self._new_refresh(record.grant)
        if self.rotation == "strict":
            record.alive = False
        return self._issue(record.grant, new_refresh, nonce=None)

    def _new_refresh(self, grant: _Grant) -> str:
        token = secrets.token_urlsafe(32)
        self._refresh[token] = _Refresh(grant=grant)
        return token

    def _issue(self, grant: _Grant, refresh_token: str | None, nonce: str | None) -> dict[str, Any]:
        access = secrets.token_urlsafe(32)
        self._access[access] = _Access(grant=grant, expires_at=time.time() + self.access_token_ttl)
        out: dict[str, Any] = {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": self.access_token_ttl,
        }
        if refresh_token is not None:
            out["refresh_token"] = refresh_token
        if not self.omit_scope_in_response:
            out["scope"] = grant.scope
        if self.issue_id_token:
            out["id_token"] = self._id_token(grant.email, nonce)
        return out

    def _id_token(self, email: str, nonce: str | None) -> str:
        # HS256 signed by hand: PyJWT emits InsecureKeyLengthWarning for secrets < 32 bytes,
        # which pytest's filterwarnings=error would turn into a server error. Same JWT bytes.
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.base_url,
            "aud": self.client_id,
            "sub": self.sub_for(email),
            "email": email,
            "email_verified": True,
            "preferred_username": email,
            "iat": now,
            "exp": now + self.access_token_ttl,
        }
        if nonce:
            claims["nonce"] = nonce
        header = {"alg": "HS256", "typ": "JWT"}
        signing_input = ".".join(
            _b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)
        )
        key = self.client_secret.encode()
        sig = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{_b64url(sig)}"

    def _userinfo(self, headers: dict[str, str]) -> _Reply:
        auth = next((v for k, v in headers.items() if k.lower() == "authorization"), "")
        scheme, _, token = auth.partition(" ")
        with self._lock:
            record = self._access.get(token.strip()) if scheme.lower() == "bearer" else None
            if record is None or not record.live():
                return _json_reply(
                    401,
                    {"error": "invalid_token"},
                    {"WWW-Authenticate": 'Bearer error="invalid_token"'},
                )
            email = record.grant.email
        return _json_reply(
            200, {"sub": self.sub_for(email), "email": email, "email_verified": True}
        )

    def _revoke(self, form: dict[str, str]) -> _Reply:
        token = form.get("token")
        if not token:
            raise _OAuthError(400, "invalid_request", "token required")
        with self._lock:
            self.revoked.append(token)
            record = self._access.get(token) or self._refresh.get(token)
            if record is not None:
                record.grant.alive = False
        return 200, b"", {"Content-Type": "text/plain"}

    def _introspect(self, q: dict[str, str], headers: dict[str, str]) -> _Reply:
        token = q.get("token", "")
        auth = next((v for k, v in headers.items() if k.lower() == "authorization"), "")
        if not token and auth.lower().startswith("bearer "):  # Dovecot introspection_mode=auth
            token = auth[7:].strip()
        with self._lock:
            access, refresh = self._access.get(token), self._refresh.get(token)
            if access is not None and access.live():
                grant, extra = (
                    access.grant,
                    {"token_type": "Bearer", "exp": int(access.expires_at)},
                )
            elif refresh is not None and refresh.alive and refresh.grant.alive:
                grant, extra = refresh.grant, {"token_type": "refresh_token"}
            else:
                return _json_reply(200, {"active": False})
            return _json_reply(
                200,
                {
                    "active": True,
                    "email": grant.email,
                    "username": grant.email,
                    "sub": self.sub_for(grant.email),
                    "scope": grant.scope,
                    "client_id": self.client_id,
                    **extra,
                },
            )

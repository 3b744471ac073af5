"""Access guard of the local web UIs (the Dagster UI and the inspector): an ASGI middleware.

Threats (docs/SECURITY.md): a web page the operator opens in the same browser can send requests to
``http://127.0.0.1:3000`` (an ``<img src>`` or a form POST needs no permission, and dagster-webserver
executes GraphQL *mutations sent as GET* and a POST of any content type from its query string); a page
whose DNS name is rebound to 127.0.0.1 is even same-origin with the UI; and on a shared machine every
user can connect to the loopback interface. :class:`WebGuard` wraps the real ASGI app and, before the
app sees a request or a WebSocket handshake:

1. refuses a ``Host`` that is not this server's bound name/address and port (DNS rebinding), on every
   request;
2. with an access token (:class:`GuardConfig.token`), refuses every request and WebSocket without it.
   ``?token=...`` on a page load is exchanged for an HttpOnly, SameSite=Strict cookie (as Jupyter does),
   so the UI's own requests keep working; scripts can send ``Authorization: Bearer <token>`` or
   ``X-DDR-Token``;
3. refuses a state-changing request (any method but GET/HEAD/OPTIONS) and every WebSocket handshake
   whose ``Origin`` is not this server (``Sec-Fetch-Site`` decides when a browser sent no Origin;
   a client without either is not a browser);
4. on the GraphQL endpoint, refuses a GET whose document has anything but ``query`` operations, and a
   POST whose content type is not exactly ``application/json`` (dagster-webserver reads the query
   string for any other type, and tests ``"application/json" in content_type``, which
   ``text/plain;application/json`` -- a type a cross-site form or no-preflight fetch may send --
   satisfies).

No dagster import: the inspector (Streamlit ``st.App``, ``ddr_core/inspector_server.py``) uses the same
middleware, and ``dagster_project/launcher.py`` wraps the Dagster webserver's Starlette app in it.
"""

from __future__ import annotations

import errno
import hmac
import html
import ipaddress
import logging
import re
import secrets
import socket
from typing import Any
from urllib.parse import urlencode, urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.datastructures import Headers, QueryParams
from starlette.responses import HTMLResponse, PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

LOGGER = logging.getLogger("ddr.web_guard")
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9_-]{16,128}")
TOKEN_ENV = "DDR_ACCESS_TOKEN"
GUARD_ENV = "DDR_WEB_GUARD"  # a GuardConfig as JSON, handed to a server started as a subprocess
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})
_HOST_PATTERN = re.compile(r"[A-Za-z0-9._:\[\]-]{1,255}")


class PortInUseError(OSError):
    """The port to serve on is taken (or not permitted); the message names the port and the fix."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is a loopback interface."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def new_token() -> str:
    """A fresh random access token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def _format_host(name: str) -> str:
    name = name.strip("[]").lower()
    return f"[{name}]" if ":" in name else name


def normalize_authority(value: str, default_port: int) -> str | None:
    """``host:port`` of a Host header / URL authority, lower case, IPv6 in brackets; None when malformed."""
    value = value.strip().lower()
    if not value or not _HOST_PATTERN.fullmatch(value):
        return None
    try:
        parts = urlsplit(f"//{value}")
        port = parts.port
        name = parts.hostname
    except ValueError:
        return None
    if not name:
        return None
    return f"{_format_host(name)}:{port or default_port}"


class GuardConfig(BaseModel):
    """What :class:`WebGuard` accepts. ``bind_host``/``port``: where the server listens (the Host names
    allowed follow from them); ``extra_hosts``: further ``name`` or ``name:port`` a browser may use
    (an SSH tunnel on another local port, a DNS name of this machine); ``token``: the access token, or
    None for none; ``graphql_paths``: the GraphQL endpoint(s) whose GET/POST rules apply."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bind_host: str
    port: int = Field(ge=1, le=65535)
    extra_hosts: tuple[str, ...] = ()
    token: str | None = None
    graphql_paths: tuple[str, ...] = ("/graphql",)
    service: str = "ddr web UI"

    @field_validator("token")
    @classmethod
    def _token_shape(cls, value: str | None) -> str | None:
        if value is not None and not TOKEN_PATTERN.fullmatch(value):
            raise ValueError(f"the access token must be 16-128 characters of A-Z a-z 0-9 _ - "
                             f"(set {TOKEN_ENV} to such a value, or unset it for a random one)")
        return value

    @field_validator("extra_hosts")
    @classmethod
    def _hosts_shape(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for host in value:
            if normalize_authority(host, 80) is None:
                raise ValueError(f"--allow-host {host!r} is not a host name or host:port")
        return value

    @property
    def cookie_name(self) -> str:
        # cookies are not separated by port: one name per port keeps two servers' tokens apart
        return f"ddr_token_{self.port}"

    def allowed_authorities(self) -> frozenset[str]:
        """The ``host:port`` values a browser may send as Host (and, as origin, as Origin) to this server."""
        host = self.bind_host.strip("[]").lower()
        names: set[str] = set()
        if host in WILDCARD_HOSTS:
            names.update(LOOPBACK_NAMES)
            names.update(_this_machine_names())
        elif is_loopback(host):
            names.update(LOOPBACK_NAMES)
            names.add(host)
        else:
            names.add(host)
        allowed = {f"{_format_host(name)}:{self.port}" for name in names if name}
        for extra in self.extra_hosts:
            authority = normalize_authority(extra, self.port)
            if authority is not None:
                allowed.add(authority)
        return frozenset(allowed)

    def url(self, path: str = "/") -> str:
        """The URL to open: on the bound address (``127.0.0.1`` for a wildcard), with the token if any."""
        host = self.bind_host.strip("[]")
        if host in WILDCARD_HOSTS:
            host = "127.0.0.1"
        query = f"?{urlencode({'token': self.token})}" if self.token else ""
        return f"http://{_format_host(host)}:{self.port}{path}{query}"


def _this_machine_names() -> set[str]:
    """This machine's host name, FQDN and the addresses they resolve to (what a browser elsewhere may use
    when the server listens on every interface)."""
    names = {socket.gethostname().lower(), socket.getfqdn().lower()}
    for name in list(names):
        try:
            names.update(socket.gethostbyname_ex(name)[2])
        except OSError:
            pass
    return names


def graphql_document_only_queries(document: str) -> bool:
    """Whether a GraphQL document parses and every operation in it is a ``query``.

    Without graphql-core (the inspector's environment may lack it) nothing counts as a plain query."""
    try:
        from graphql import OperationType, parse
        from graphql.error import GraphQLError
        from graphql.language import OperationDefinitionNode
    except ImportError:
        return False
    try:
        parsed = parse(document)
    except GraphQLError:
        return False
    operations = [d for d in parsed.definitions if isinstance(d, OperationDefinitionNode)]
    return bool(operations) and all(op.operation == OperationType.QUERY for op in operations)


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


class WebGuard:
    """ASGI middleware enforcing :class:`GuardConfig` in front of ``app`` (see the module docstring)."""

    def __init__(self, app: ASGIApp, config: GuardConfig) -> None:
        self.app = app
        self.config = config
        self._allowed = config.allowed_authorities()
        # we serve plain http; https only for a name given with --allow-host (a TLS proxy in front of us)
        self._allowed_origins = ({f"http://{a}" for a in self._allowed}
                                 | {f"https://{normalize_authority(h, 443)}" for h in config.extra_hosts})
        self._token = config.token.encode() if config.token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        query = QueryParams(scope.get("query_string", b""))
        method = scope.get("method", "GET") if scope["type"] == "http" else "WEBSOCKET"

        problem = self._host_problem(headers)
        if problem is None and self._token is not None:
            query_token = query.get("token")
            if query_token is not None and self._valid(query_token):
                if scope["type"] == "http" and method == "GET" and "text/html" in headers.get("accept", ""):
                    await self._set_cookie_and_reload(scope, receive, send, query)
                    return
            elif not self._has_valid_credentials(headers):
                problem = (f"access token required: open the URL with ?token=... that {self.config.service} "
                           "printed when it started")
        if problem is None and (scope["type"] == "websocket" or method not in SAFE_METHODS):
            problem = self._origin_problem(headers)
        status = 403
        if problem is None and scope["type"] == "http" and self._is_graphql(scope):
            problem, status = self._graphql_problem(method, headers, query)
        if problem is None:
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        shown = path if path.isprintable() and len(path) <= 200 else repr(path[:200])  # no forged log lines
        LOGGER.warning("%s refused %s %s: %s", self.config.service, method, shown, problem)
        await self._refuse(scope, receive, send, problem, status)

    # --- checks -------------------------------------------------------------------------------------

    def _host_problem(self, headers: Headers) -> str | None:
        raw = headers.get("host", "")
        authority = normalize_authority(raw, 80)
        if authority is None or authority not in self._allowed:
            return (f"Host {raw[:100]!r} is not this server's (a DNS-rebinding page?); open it as "
                    f"{self.config.url().split('?')[0]} or allow the name with --allow-host")
        return None

    def _valid(self, token: str) -> bool:
        assert self._token is not None
        return hmac.compare_digest(token.encode(), self._token)

    def _has_valid_credentials(self, headers: Headers) -> bool:
        candidates = [headers.get("x-ddr-token", "")]
        authorization = headers.get("authorization", "")
        if authorization.lower().startswith("bearer "):
            candidates.append(authorization[7:].strip())
        cookie_header = headers.get("cookie", "")
        prefix = f"{self.config.cookie_name}="
        for part in cookie_header.split(";"):
            part = part.strip()
            if part.startswith(prefix):
                candidates.append(part[len(prefix):])
        return any(c and self._valid(c) for c in candidates)

    def _origin_problem(self, headers: Headers) -> str | None:
        origin = headers.get("origin")
        if origin is None:
            site = headers.get("sec-fetch-site")
            if site is not None and site not in ("same-origin", "none"):
                return f"cross-site request (Sec-Fetch-Site: {site[:30]})"
            return None  # not a browser (curl, scripts): the Host and token checks apply to it
        parts = urlsplit(origin.strip().lower())
        authority = normalize_authority(parts.netloc, 443 if parts.scheme == "https" else 80)
        if parts.scheme not in ("http", "https") or f"{parts.scheme}://{authority}" not in self._allowed_origins:
            return f"cross-origin request from {origin[:100]!r}"
        return None

    def _is_graphql(self, scope: Scope) -> bool:
        path = scope.get("path", "")
        return any(path == p or path == p + "/" for p in self.config.graphql_paths)

    def _graphql_problem(self, method: str, headers: Headers, query: QueryParams) -> tuple[str | None, int]:
        if method == "GET":
            for document in query.getlist("query"):
                if not graphql_document_only_queries(document):
                    return ("GraphQL over GET may only read (query operations): send mutations as POST "
                            "with Content-Type: application/json", 403)
            return None, 200
        if method == "POST" and _media_type(headers.get("content-type")) != "application/json":
            return ("GraphQL POST needs Content-Type: application/json (got "
                    f"{headers.get('content-type', 'none')[:80]!r})", 415)
        return None, 200

    # --- responses ----------------------------------------------------------------------------------

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, problem: str, status: int) -> None:
        if scope["type"] == "websocket":
            # closing before accepting makes the server answer the handshake with HTTP 403
            await send({"type": "websocket.close", "code": 1008, "reason": problem[:120]})
            return
        response = PlainTextResponse(f"{status} refused by the ddr web guard: {problem}\n", status_code=status,
                                     headers={"Cache-Control": "no-store"})
        await response(scope, receive, send)

    async def _set_cookie_and_reload(self, scope: Scope, receive: Receive, send: Send,
                                     query: QueryParams) -> None:
        """Answer a page load with ``?token=`` by setting the cookie and reloading the page without the
        token in the URL. A page (not a 303): a navigation started by this page is same-site, so the
        SameSite=Strict cookie goes with it even when the token link was opened from another site."""
        rest = [(k, v) for k, v in query.multi_items() if k != "token"]
        path = "/" + scope.get("path", "/").lstrip("/")  # never "//host": no open redirect
        target = path + (f"?{urlencode(rest)}" if rest else "")
        quoted = html.escape(target, quote=True)
        body = (f'<!doctype html><meta charset="utf-8"><meta http-equiv="refresh" content="0; url={quoted}">'
                f'<title>{html.escape(self.config.service)}</title><a href="{quoted}">continue</a>')
        response = HTMLResponse(body, headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})
        assert self.config.token is not None
        response.set_cookie(self.config.cookie_name, self.config.token, httponly=True, samesite="strict",
                            path="/")
        await response(scope, receive, send)


def bind_listening_socket(host: str, port: int, *, what: str = "the server") -> socket.socket:
    """A listening TCP socket on ``host:port``, or :class:`PortInUseError` naming the port and the fix.

    Bound before anything slow starts, so a taken port fails at once instead of after "Serving on ..."."""
    try:
        infos = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise PortInUseError(f"cannot serve {what} on {host!r}: {exc.strerror} (check --host)") from exc
    family, kind, proto, _canon, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT does not block
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUseError(
                f"port {port} on {host} is already in use (another Dagster UI or inspector?): start "
                f"{what} on a free port with --port {port + 1} (or any free one), or stop the program "
                f"listening there (`ss -ltnp 'sport = :{port}'` names it)") from exc
        raise PortInUseError(f"cannot listen on {host}:{port} for {what}: {exc.strerror} "
                             "(choose another --port / --host)") from exc
    sock.set_inheritable(True)
    return sock


def port_is_free(host: str, port: int, *, what: str = "the server") -> None:
    """Raise :class:`PortInUseError` when ``host:port`` cannot be bound now (for servers we do not bind)."""
    bind_listening_socket(host, port, what=what).close()


def wait_for_port(host: str, port: int, *, timeout_s: float, alive=lambda: True) -> bool:
    """Whether ``host:port`` accepts connections within ``timeout_s`` (False early when not ``alive()``)."""
    import time

    host = "127.0.0.1" if host.strip("[]") in WILDCARD_HOSTS else host.strip("[]")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and alive():
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            time.sleep(0.2)
    return False


def resolve_token(enabled: bool, host: str, env: dict[str, Any] | None = None) -> str | None:
    """The access token to use: None when disabled (refused on a non-loopback ``host``), else
    ``$DDR_ACCESS_TOKEN`` when set (a stable token across restarts), else a new random one."""
    import os

    if not enabled:
        if not is_loopback(host):
            raise ValueError(f"--no-token is refused when serving on {host!r} (not loopback): anyone who can "
                             "reach that address would control the UI; keep the token, or serve on "
                             "127.0.0.1 and reach it through an SSH tunnel")
        return None
    fixed = (os.environ if env is None else env).get(TOKEN_ENV)
    if fixed:
        if not TOKEN_PATTERN.fullmatch(fixed):
            raise ValueError(f"{TOKEN_ENV} must be 16-128 characters of A-Z a-z 0-9 _ - (or unset it for a "
                             "random token)")
        return fixed
    return new_token()

"""Who may talk to the app: every request is checked before Dash sees it.

- **Host header.** Only the names the app serves on are accepted (loopback names by default: ``127.0.0.1``,
  ``localhost``, ``::1``). A web page the user visits cannot reach the app by DNS rebinding (its requests carry the
  attacker's host name) and gets HTTP 403.
- **Access token.** Served beyond loopback, the app requires a token (``attnlab app`` generates one and prints the
  URL with it, like Jupyter). The first page load passes it as ``?token=...``; the app answers with a cookie
  (HttpOnly, SameSite=Strict) that the page's own requests then carry, including Dash's callback route. A request
  without a valid token gets HTTP 403. An ``X-Attnlab-Token`` header also works (scripts).
- **Body size.** Request bodies larger than ``max_body_bytes`` are refused with HTTP 413 before they are read.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
from collections.abc import Iterable

LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})
TOKEN_COOKIE = "attnlab_token"
TOKEN_HEADER = "X-Attnlab-Token"


def is_loopback(host: str) -> bool:
    """A loopback name or address literal (``localhost``, ``127.0.0.0/8``, ``::1``)."""
    name = host_name(host)
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_name(host_header: str) -> str:
    """``"[::1]:8050"`` -> ``"::1"``, ``"LocalHost.:8050"`` -> ``"localhost"``."""
    h = (host_header or "").strip().lower()
    if h.startswith("["):
        h = h[1 : h.find("]")] if "]" in h else h[1:]
    elif h.count(":") == 1:
        h = h.split(":", 1)[0]
    return h.rstrip(".")


def new_token() -> str:
    return secrets.token_urlsafe(24)


def allowed_hosts(serve_host: str, extra: Iterable[str] = ()) -> frozenset[str] | None:
    """Host names accepted for an app served on ``serve_host``: loopback names plus the host itself; None (any
    name) for a wildcard bind (``0.0.0.0``), which is only served with a token."""
    name = host_name(serve_host)
    if name in WILDCARD_HOSTS:
        return None
    return frozenset(LOOPBACK_NAMES | {name} | {host_name(h) for h in extra})


def install(server, *, hosts: frozenset[str] | None, token: str | None, max_body_bytes: int) -> None:
    """Check Host, token and body size on every request of a Flask ``server``."""
    from flask import abort, request  # (flask comes with dash: imported when a server is guarded)

    server.config["MAX_CONTENT_LENGTH"] = max_body_bytes

    @server.before_request
    def _check():
        name = host_name(request.host)
        if hosts is not None and name not in hosts and not is_loopback(name):
            abort(403, description="this host name is not served here")
        if request.content_length is not None and request.content_length > max_body_bytes:
            abort(413)
        if token is not None:
            given = request.args.get("token") or request.headers.get(TOKEN_HEADER) or request.cookies.get(TOKEN_COOKIE)
            if not given or not hmac.compare_digest(str(given).encode(), token.encode()):
                abort(403, description="a valid access token is required (open the URL attnlab app printed)")

    @server.after_request
    def _remember(response):
        given = request.args.get("token") if token is not None else None
        if given and hmac.compare_digest(str(given).encode(), token.encode()):  # only a valid token sets the cookie
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="Strict")
        return response

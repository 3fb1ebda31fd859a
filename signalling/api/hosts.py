"""The Host header check that stops DNS rebinding.

A page on ``http://evil.example:8000`` whose name its owner re-points at 127.0.0.1 is, to the
browser, same-origin with itself: it can read anything this server answers (the log, the TURN
credential, a session's captions of the user's camera). What gives it away is the ``Host``
header, which carries the page's name. So, as Jupyter and Vite do, every request (reads,
writes, WebSockets) must name this server by a name it knows:

* an IP address (a rebinding page cannot make the browser send one for its own name);
* ``localhost`` or a name under ``.localhost``;
* a name in ``[api] allowed_hosts`` (``"example.com"``, ``".example.com"`` for it and every name
  under it, ``"*"`` for any: only behind a proxy that checks the name itself).

On a loopback bind (the default, 127.0.0.1) only loopback addresses count as IP addresses: no
other machine can reach the server under another. A request without a Host header (HTTP/1.0,
not a browser) passes. A refused one gets 403 naming the setting.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable

import msgspec
from aiohttp import web
from aiohttp.typedefs import Middleware

from signalling.api.types import ErrorResponse

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def split_host(host: str) -> str:
    """The name or address of a Host header, without its port and brackets, lower case."""
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:8000
        return host[1 : host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    return host.rstrip(".")


def _address(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def is_loopback_bind(bind: str) -> bool:
    address = _address(bind)
    return bind == "localhost" or (address is not None and address.is_loopback)


def host_allowed(host: str, allowed: list[str], loopback_bind: bool) -> bool:
    name = split_host(host)
    if not name:
        return False
    address = _address(name)
    if address is not None:
        return address.is_loopback or not loopback_bind
    if name == "localhost" or name.endswith(".localhost"):
        return True
    for pattern in allowed:
        pattern = pattern.strip().lower().rstrip(".")
        if pattern == "*" or name == pattern.lstrip("."):
            return True
        if pattern.startswith(".") and name.endswith(pattern):
            return True
    return False


def host_middleware(bind: str, allowed: list[str]) -> Middleware:
    loopback = is_loopback_bind(bind)

    @web.middleware
    async def check_host(request: web.Request, handler: Handler) -> web.StreamResponse:
        host = request.headers.get("Host")
        if host is None or host_allowed(host, allowed, loopback):
            return await handler(request)
        logger.warning("refused a request for host %r (%s %s)", host, request.method, request.path)
        body = ErrorResponse(
            error="host_not_allowed",
            detail=f"Host {host!r} is not a name of this server: add it to [api] allowed_hosts "
            "in the server's config if it is",
        )
        return web.Response(
            status=403, body=msgspec.json.encode(body), content_type="application/json"
        )

    return check_host
